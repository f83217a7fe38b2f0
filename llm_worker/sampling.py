"""Per-request llama.cpp sampler chains, grammars and log-probabilities (engine thread only, except
`grammar_for`, which is plain Python and runs before a request reaches the engine)."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llm_worker import llama_lib
from llm_worker.llama_model import LlamaModel
from llm_worker.types import Sampling, TokenLogprob, TopLogprob
from mesh.errors import InvalidArgument


def grammar_for(sampling: Sampling) -> str:
    """The GBNF grammar a request asks for, converting a JSON schema; "" when it asks for none."""
    if sampling.grammar and sampling.json_schema:
        raise InvalidArgument("set grammar or json_schema, not both", field="sampling.json_schema")
    if not sampling.json_schema:
        return sampling.grammar
    try:
        json.loads(sampling.json_schema)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"not valid JSON: {exc}", field="sampling.json_schema") from exc
    try:
        converted: Any = json_schema_to_gbnf(sampling.json_schema)
    except Exception as exc:  # the converter raises whatever its schema walk hits
        raise InvalidArgument(
            f"cannot turn the schema into a grammar: {type(exc).__name__}: {exc}",
            field="sampling.json_schema",
        ) from exc
    return str(converted)


def _grammar_error(printed: Sequence[str], logged: Sequence[str]) -> str:
    marker = "error parsing grammar: "
    for line in printed:
        if marker in line:
            return line.split(marker, 1)[1]
    reasons = [line for line in logged if line != "failed to parse grammar"]
    return reasons[-1] if reasons else "llama.cpp rejected it"


def compile_grammar(model: LlamaModel, gbnf: str) -> llama_cpp.llama_sampler_p:
    """A llama.cpp grammar sampler; InvalidArgument with the parser's message when the grammar is wrong."""
    with llama_lib.stderr_lines() as printed, llama_lib.logged_lines() as logged:
        sampler: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_init_grammar(
            model.vocab, gbnf.encode("utf-8"), b"root"
        )
    if not sampler:
        raise InvalidArgument(f"invalid grammar: {_grammar_error(printed, logged)}", field="sampling.grammar")
    return sampler


class SamplerChain:
    """logit bias, grammar, penalties, top-k, typical, top-p, min-p, temperature, then dist(seed) or greedy,
    as the llama.cpp server orders them. Owns its llama.cpp samplers; `free()` releases them."""

    def __init__(self, model: LlamaModel, sampling: Sampling, gbnf: str, window: int) -> None:
        grammar = compile_grammar(model, gbnf) if gbnf else None
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        self._freed = False
        self._add_logit_bias(model, sampling)
        if grammar is not None:
            self._add(grammar)
        self._last_n = window if sampling.repeat_last_n < 0 else sampling.repeat_last_n
        self._penalties = self._add_penalties(model, sampling)
        if sampling.temperature <= 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        self._add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        self._add(llama_cpp.llama_sampler_init_typical(sampling.typical_p, 1))
        self._add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        self._add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed < 0 else sampling.seed & 0xFFFFFFFF
        self._add(llama_cpp.llama_sampler_init_dist(seed))

    def _add_logit_bias(self, model: LlamaModel, sampling: Sampling) -> None:
        bias = dict(sampling.logit_bias)
        if sampling.ignore_eos:
            bias.update(dict.fromkeys(model.eog_tokens, -math.inf))
        if not bias:
            return
        entries = (llama_cpp.llama_logit_bias * len(bias))()
        for entry, (token, value) in zip(entries, bias.items(), strict=True):
            entry.token = token
            entry.bias = value
        self._add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(bias), entries))

    def _add_penalties(self, model: LlamaModel, sampling: Sampling) -> llama_cpp.llama_sampler_p | None:
        strengths = (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty)
        if not self._last_n or strengths == (1, 0, 0):
            return None
        return self._add(llama_cpp.llama_sampler_init_penalties(model.n_vocab, self._last_n, *strengths))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> llama_cpp.llama_sampler_p:
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)
        return sampler

    def remember_prompt(self, prompt: Sequence[int]) -> None:
        """Let the penalties see the end of the prompt, as llama.cpp's server does (the grammar must not)."""
        if self._penalties is not None:
            for token in prompt[-self._last_n :]:
                llama_cpp.llama_sampler_accept(self._penalties, token)

    def sample(self, model: LlamaModel, index: int) -> int:
        """Samples and accepts the next token from output `index` of the last decode."""
        return int(llama_cpp.llama_sampler_sample(self.ptr, model.ctx, index))

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            llama_cpp.llama_sampler_free(self.ptr)


def logprobs(model: LlamaModel, index: int, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the model's own distribution, and the `top` most likely."""
    pointer = llama_cpp.llama_get_logits_ith(model.ctx, index)
    logits = np.ctypeslib.as_array(
        ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(model.n_vocab,)
    )
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak).sum()))
    best = np.argpartition(-logits, top)[:top] if top < model.n_vocab else np.arange(model.n_vocab)
    best = best[np.argsort(-logits[best], kind="stable")]

    def entry(t: int) -> tuple[str, bytes]:
        raw = model.piece(t, special=True)
        return raw.decode("utf-8", errors="replace"), raw

    text, raw = entry(token)
    return TokenLogprob(
        token_id=token,
        token=text,
        logprob=float(logits[token]) - log_total,
        raw=raw,
        top=tuple(
            TopLogprob(
                token_id=int(t),
                token=entry(int(t))[0],
                logprob=float(logits[t]) - log_total,
                raw=entry(int(t))[1],
            )
            for t in best
        ),
    )
