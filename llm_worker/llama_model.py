"""One GGUF model and its llama.cpp context, owned by the engine thread: loading, vocabulary, batches.

Nothing here may run on the event loop; `LlamaEngine` calls it from its engine thread only.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from llm_worker import llama_lib
from llm_worker.models import ModelLoadError
from llm_worker.settings import CTX_PER_SLOT
from mesh.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaConfig:
    path: Path
    model_id: str = ""
    ctx_size: int = 0  # tokens for all slots together (0: chosen by `auto_context`)
    slots: int = 4
    threads: int = 2
    batch_size: int = 512
    prefill_chunk: int = 0  # prompt tokens per step at most (0: as many as the batch holds)
    flash_attn: str = "auto"  # "auto", "on" or "off"
    kv_unified: bool = False  # one KV cache that every slot attends over (bench.llm_steps compares it)
    gpu_layers: int = 0


_FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
KV_MEMORY_SHARE = 4  # `auto_context` keeps the KV cache within 1/this of the memory available at start


@dataclass(frozen=True)
class ContextChoice:
    """The context size `--ctx-size 0` chose, and why (logged at start)."""

    tokens: int
    why: str


def auto_context(
    slots: int, n_ctx_train: int, kv_bytes_per_token: int, available: int | None
) -> ContextChoice:
    """`slots` x min(CTX_PER_SLOT, the model's training context), cut to keep the KV cache within
    1/KV_MEMORY_SHARE of `available` bytes (None: unknown or not host memory, e.g. layers on a GPU).

    A larger context than used costs memory and, once prompt caches fill it, attention time every step,
    so the default stops at CTX_PER_SLOT: room for a 1,000-token chat history and its answer.
    """
    per_slot = min(CTX_PER_SLOT, n_ctx_train) if n_ctx_train > 0 else CTX_PER_SLOT
    why = f"{slots} slots x {per_slot} (model trained on {n_ctx_train})"
    if available is not None and kv_bytes_per_token > 0:
        fits = available // KV_MEMORY_SHARE // kv_bytes_per_token // slots
        if fits < per_slot:
            per_slot = max(256, fits // 256 * 256)
            why = f"{slots} slots x {per_slot}: KV cache within 1/{KV_MEMORY_SHARE} of available memory"
    kv_mib = slots * per_slot * kv_bytes_per_token / 2**20
    return ContextChoice(slots * per_slot, f"{why}; KV cache {kv_mib:.0f} MiB")


def available_memory() -> int | None:
    """Bytes of memory available for new allocations (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _why(lines: Sequence[str]) -> str:
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return "; ".join(errors[-3:]) or "see the worker log"


class LlamaModel:
    """The model, one context with `slots` sequences, each with a KV cache of its own, and token helpers."""

    def __init__(self, config: LlamaConfig) -> None:
        llama_lib.set_up()
        self.config = config
        params = llama_cpp.llama_model_default_params()
        # -1 offloads every layer; a CPU-only build of llama.cpp ignores the request.
        params.n_gpu_layers = 2**31 - 1 if config.gpu_layers < 0 else config.gpu_layers
        if config.gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            log.warning(
                "--gpu-layers %d asked for, but this llama.cpp build has no GPU support", config.gpu_layers
            )
        with llama_lib.logged_lines() as lines:
            model = llama_cpp.llama_model_load_from_file(str(config.path).encode(), params)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {str(config.path)!r}: {_why(lines)}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd: int = llama_cpp.llama_model_n_embd(model)
        self.n_embd_out: int = llama_cpp.llama_model_n_embd_out(model)  # what an embedding holds
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(model)
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.context = (
            ContextChoice(config.ctx_size, "--ctx-size")
            if config.ctx_size
            else auto_context(
                config.slots,
                n_ctx_train,
                self._kv_bytes_per_token(),
                None if config.gpu_layers else available_memory(),
            )
        )
        if 0 < n_ctx_train < self.context.tokens // config.slots:
            log.warning(
                "each slot gets %d tokens of context, more than the %d the model was trained on: output past "
                "that may degrade", self.context.tokens // config.slots, n_ctx_train,
            )  # fmt: skip

        ctx_params = llama_cpp.llama_context_default_params()
        per_slot = self.context.tokens // config.slots
        # llama.cpp sizes each sequence's cache in steps of 256 cells; the batcher holds a job to `per_slot`.
        ctx_params.n_ctx = config.slots * -(-per_slot // 256) * 256
        ctx_params.n_batch = config.batch_size
        ctx_params.n_ubatch = config.batch_size
        ctx_params.n_seq_max = config.slots
        ctx_params.n_threads = config.threads
        ctx_params.n_threads_batch = config.threads
        # By default one KV stream per slot: each sequence attends to its own cells only, so the prompt
        # caches other slots keep cost it nothing (`python -m bench.llm_steps --layouts` measures both).
        ctx_params.kv_unified = config.kv_unified
        ctx_params.no_perf = True
        ctx_params.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        with llama_lib.logged_lines() as lines:
            ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(
                f"llama.cpp could not create a context of {self.context.tokens} tokens for {config.slots} "
                f"slots (too large for memory? try a smaller --ctx-size): {_why(lines)}"
            )
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        # An embedding model (BERT and kin) gets no KV cache: it can embed, not generate.
        self.generates = self.memory is not None
        self.n_ctx_seq: int = min(per_slot, llama_cpp.llama_n_ctx_seq(ctx))
        self.n_batch: int = llama_cpp.llama_n_batch(ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.eog_tokens = tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_text = self._special_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(llama_cpp.llama_vocab_eos(self.vocab))
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8", errors="replace") if template else None
        self.name = self.meta("general.name") or config.path.stem

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def _kv_bytes_per_token(self) -> int:
        """Bytes one token takes in an f16 KV cache (keys and values of every layer)."""
        model = self.model
        n_head = llama_cpp.llama_model_n_head(model) or 1
        arch = self.meta("general.architecture")
        head_k = int(self.meta(f"{arch}.attention.key_length") or 0)
        head_k = head_k or llama_cpp.llama_model_n_embd(model) // n_head
        head_v = int(self.meta(f"{arch}.attention.value_length") or 0) or head_k
        n_kv = llama_cpp.llama_model_n_head_kv(model)
        return int(llama_cpp.llama_model_n_layer(model) * n_kv * (head_k + head_v) * 2)

    def meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(1024)
        size = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, ctypes.sizeof(buf))
        return buf.value.decode("utf-8", errors="replace") if size >= 0 else ""

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        room = len(raw) + 2
        tokens = (llama_cpp.llama_token * room)()
        count = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), tokens, room, add_special, parse_special)
        if count < 0:
            room = -count
            tokens = (llama_cpp.llama_token * room)()
            count = llama_cpp.llama_tokenize(
                self.vocab, raw, len(raw), tokens, room, add_special, parse_special
            )
        return list(tokens[:count])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token; control tokens render empty unless `special`."""
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if size < 0:
                buf = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            cached = self._pieces[key] = buf.raw[:size]
        return cached

    def checked(self, tokens: Sequence[int], field: str = "tokens") -> Sequence[int]:
        """The tokens, when every id is in the vocabulary (llama.cpp does not check)."""
        wrong = [t for t in tokens if not 0 <= t < self.n_vocab]
        if wrong:
            raise InvalidArgument(f"token ids must be 0 to {self.n_vocab - 1}; got {wrong[:5]}", field=field)
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t, special=True) for t in tokens).decode("utf-8", errors="replace")

    def logits(self, index: int) -> np.ndarray[Any, Any]:
        """The logits of output `index` of the last decode: a view of llama.cpp's buffer, valid until the
        next decode."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
        )

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def forget(self, seq_id: int, keep: int = 0) -> bool:
        """Drop the KV cells of `seq_id` from position `keep` on; False when llama.cpp cannot cut there."""
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, keep, -1))

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> int:
        """One llama_decode of (token, position, sequence, wants logits) entries; llama.cpp's return code."""
        batch = self.batch
        for i, (token, pos, seq_id, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        return int(llama_cpp.llama_decode(self.ctx, batch))
