"""Embeddings on the engine thread: a second llama.cpp context over the same loaded model, made on first use
(one per pooling kind asked for), with pooling done in llama.cpp's graph as `llama-server --embeddings` does.

Inputs are packed into batches (many sequences in one `llama_decode`, each wholly inside it, as pooling
needs); one batch is one call on the engine thread, so text generation goes on between batches.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp

from llm_worker import llama_lib
from llm_worker.llama_model import LlamaModel
from llm_worker.types import Pooling, Vector
from mesh.errors import Internal, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

# Inputs in one llama_decode at most. In one batch every token's attention spans the whole batch (masked), so
# a batch of many short inputs wastes attention work; 16 was fastest of 4, 16 and 64 (64 short texts, 2 CPU
# threads, best of 6: 4.83 s vs 5.26 and 5.87).
MAX_SEQUENCES = 16
_POOLING = {
    Pooling.MEAN: llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    Pooling.CLS: llama_cpp.LLAMA_POOLING_TYPE_CLS,
    Pooling.LAST: llama_cpp.LLAMA_POOLING_TYPE_LAST,
}


def model_pooling(model: LlamaModel) -> Pooling:
    """The pooling the model's GGUF names (`<arch>.pooling_type`), mean when it names none (decoder LMs)."""
    arch = model.meta("general.architecture")
    named = model.meta(f"{arch}.pooling_type")
    return {
        str(int(llama_cpp.LLAMA_POOLING_TYPE_CLS)): Pooling.CLS,
        str(int(llama_cpp.LLAMA_POOLING_TYPE_LAST)): Pooling.LAST,
    }.get(named, Pooling.MEAN)


@dataclass
class Prepared:
    """One input as tokens, ready to be packed into a batch."""

    index: int
    tokens: list[int]


class EmbeddingContext:
    """A llama.cpp context that outputs one pooled vector per sequence."""

    def __init__(self, model: LlamaModel, pooling: Pooling, n_ctx: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx  # a pooled sequence must fit one micro-batch whole
        params.n_ubatch = n_ctx
        params.n_seq_max = MAX_SEQUENCES
        params.n_threads = model.config.threads
        params.n_threads_batch = model.config.threads
        params.embeddings = True
        params.pooling_type = _POOLING[pooling]
        params.kv_unified = True  # sequences come and go each batch; they share one cache
        params.no_perf = True
        with llama_lib.logged_lines() as lines:
            ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not ctx:
            raise Internal(f"llama.cpp could not create an embedding context: {'; '.join(lines[-3:])}")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = n_ctx
        self.n_embd = model.n_embd_out
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def run(self, inputs: Sequence[Prepared], normalize: bool) -> list[Vector]:
        """The vectors of `inputs` (together at most n_ctx tokens, MAX_SEQUENCES inputs) in one decode."""
        batch = self.batch
        at = 0
        for seq_id, item in enumerate(inputs):
            for pos, token in enumerate(item.tokens):
                batch.token[at] = token
                batch.pos[at] = pos
                batch.n_seq_id[at] = 1
                batch.seq_id[at][0] = seq_id
                batch.logits[at] = True
                at += 1
        batch.n_tokens = at
        llama_cpp.llama_memory_clear(self.memory, False)  # forget the cells; their bytes need no zeroing
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            raise Internal(f"llama_decode failed while embedding (code {code})")
        vectors = []
        for seq_id, item in enumerate(inputs):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
            if not pointer:
                raise Internal(f"llama.cpp gave no embedding for sequence {seq_id}")
            values = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[: self.n_embd]
            if normalize:
                norm = math.sqrt(sum(v * v for v in values)) or 1.0
                values = [v / norm for v in values]
            vectors.append(Vector(item.index, tuple(values), len(item.tokens)))
        return vectors

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


class Embedder:
    """The embedding contexts of one model (engine thread only)."""

    def __init__(self, model: LlamaModel, n_ctx: int, batch_tokens: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.batch_tokens = min(batch_tokens, n_ctx)  # one longer input still goes alone, whole
        self.default = model_pooling(model)
        self._contexts: dict[Pooling, EmbeddingContext] = {}
        self._closed = False

    def prepare(self, inputs: Sequence[str | tuple[int, ...]], truncate: bool) -> list[Prepared]:
        """Tokens of every input, checked against the vocabulary and the context."""
        model, prepared = self.model, []
        for index, item in enumerate(inputs):
            field = f"inputs[{index}]"
            if isinstance(item, str):
                tokens = model.tokenize(item, add_special=True, parse_special=False)
            else:
                tokens = list(model.checked(item, field))
            if not tokens:
                raise InvalidArgument("has no tokens", field=field)
            if len(tokens) > self.n_ctx:
                if not truncate:
                    raise InvalidArgument(
                        f"{len(tokens)} tokens; the model embeds at most {self.n_ctx} (set truncate to cut)",
                        field=field,
                    )
                tokens = tokens[: self.n_ctx]
            prepared.append(Prepared(index, tokens))
        return prepared

    def batches(self, prepared: Sequence[Prepared]) -> list[list[Prepared]]:
        """Consecutive inputs packed into batches of at most `batch_tokens` tokens (the engine's step size, so
        that chats wait no longer for one batch than for one step) and MAX_SEQUENCES inputs."""
        found: list[list[Prepared]] = []
        current: list[Prepared] = []
        tokens = 0
        for item in prepared:
            if current and (tokens + len(item.tokens) > self.batch_tokens or len(current) == MAX_SEQUENCES):
                found.append(current)
                current, tokens = [], 0
            current.append(item)
            tokens += len(item.tokens)
        if current:
            found.append(current)
        return found

    def run(self, batch: Sequence[Prepared], pooling: Pooling, normalize: bool) -> list[Vector]:
        if self._closed:
            raise Unavailable("the text engine is stopping")
        kind = self.default if pooling is Pooling.MODEL else pooling
        context = self._contexts.get(kind)
        if context is None:
            context = self._contexts[kind] = EmbeddingContext(self.model, kind, self.n_ctx)
            log.info("embedding context: %d tokens, %s pooling", self.n_ctx, kind)
        return context.run(batch, normalize)

    def close(self) -> None:
        self._closed = True
        for context in self._contexts.values():
            context.close()
        self._contexts.clear()
