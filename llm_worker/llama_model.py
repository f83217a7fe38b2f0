"""One GGUF model and its llama.cpp context, owned by the engine thread: loading, vocabulary, batches.

Nothing here may run on the event loop; `LlamaEngine` calls it from its engine thread only.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from llm_worker import llama_lib
from llm_worker.models import ModelLoadError
from mesh.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaConfig:
    path: Path
    model_id: str = ""
    ctx_size: int = 4096
    slots: int = 4
    threads: int = 2
    batch_size: int = 512
    prefill_chunk: int = 0  # prompt tokens per step at most (0: as many as the batch holds)
    flash_attn: bool = False
    gpu_layers: int = 0


def _why(lines: Sequence[str]) -> str:
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return "; ".join(errors[-3:]) or "see the worker log"


class LlamaModel:
    """The model, one context with `slots` sequences over one unified KV cache, and token helpers."""

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

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = config.ctx_size
        ctx_params.n_batch = config.batch_size
        ctx_params.n_ubatch = config.batch_size
        ctx_params.n_seq_max = config.slots
        ctx_params.n_threads = config.threads
        ctx_params.n_threads_batch = config.threads
        ctx_params.kv_unified = True
        ctx_params.no_perf = True
        ctx_params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if config.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        with llama_lib.logged_lines() as lines:
            ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(
                f"llama.cpp could not create a context of {config.ctx_size} tokens for {config.slots} slots "
                f"(too large for memory? try a smaller --ctx-size): {_why(lines)}"
            )
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx: int = llama_cpp.llama_n_ctx(ctx)
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
