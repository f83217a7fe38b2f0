"""Per-request llama.cpp sampler chains, grammars and log-probabilities (engine thread only, except
`grammar_for`, which is plain Python and runs before a request reaches the engine)."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llm_worker import llama_lib
from llm_worker.llama_model import LlamaModel
from llm_worker.types import Sampling, TokenLogprob, TopLogprob
from mesh.errors import InvalidArgument


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar.

    Lazy when `trigger` is set: the output is free until it writes the trigger, and the grammar holds from
    there. `opening` is the literal that the trigger begins and the grammar's root (`gbnf`) follows: when the
    token that completes the trigger has written part of the opening already, the grammar starts from the
    rest of it (`after`); when it has written something else, the trigger was prose and the output stays
    free. (llama.cpp's own lazy grammars feed the grammar that text and abort the process when it does not
    fit.) `prefix`: the output's forced start, which the engine puts at the end of the prompt (one prefill
    instead of a decode step per token) and the grammar does not cover."""

    gbnf: str
    trigger: str = ""
    opening: str = ""
    prefix: str = ""
    field: str = "sampling.grammar"  # what an error in it is about

    def after(self, written: str) -> Grammar:
        """The (eager) grammar for the output after `written`, a start of the opening."""
        rest = self.opening[len(written) :]
        gbnf = self.gbnf.replace("root ::= ", f"root ::= {json.dumps(rest)} ", 1) if rest else self.gbnf
        return Grammar(gbnf, field=self.field)


def grammar_for(sampling: Sampling) -> Grammar | None:
    """The grammar a request's sampling asks for, converting a JSON schema; None when it asks for none."""
    if sampling.grammar and sampling.json_schema:
        raise InvalidArgument("set grammar or json_schema, not both", field="sampling.json_schema")
    if not sampling.json_schema:
        return Grammar(sampling.grammar) if sampling.grammar else None
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
    return Grammar(str(converted))


def _grammar_error(printed: Sequence[str], logged: Sequence[str]) -> str:
    marker = "error parsing grammar: "
    for line in printed:
        if marker in line:
            return line.split(marker, 1)[1]
    reasons = [line for line in logged if line != "failed to parse grammar"]
    return reasons[-1] if reasons else "llama.cpp rejected it"


def compile_grammar(model: LlamaModel, grammar: Grammar) -> llama_cpp.llama_sampler_p:
    """A llama.cpp grammar sampler (eager); InvalidArgument with the parser's message when it is wrong."""
    with llama_lib.stderr_lines() as printed, llama_lib.logged_lines() as logged:
        sampler: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_init_grammar(
            model.vocab, grammar.gbnf.encode("utf-8"), b"root"
        )
    if not sampler:
        raise InvalidArgument(f"invalid grammar: {_grammar_error(printed, logged)}", field=grammar.field)
    return sampler


TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class Candidates:
    """A llama_token_data_array over numpy memory, loaded with tokens and their logits by `fill`."""

    def __init__(self, size: int) -> None:
        self.data = np.zeros(size, dtype=TOKEN_DATA)
        self.every_id = np.arange(size, dtype=np.intc)
        self._pointer = self.data.ctypes.data_as(llama_cpp.llama_token_data_p)
        self.array = llama_cpp.llama_token_data_array(
            data=self._pointer, size=size, selected=-1, sorted=False
        )

    def fill(self, ids: np.ndarray[Any, Any] | int, logits: np.ndarray[Any, Any] | float) -> Candidates:
        self.data["id"] = ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        array = self.array
        array.data = self._pointer  # type: ignore[assignment]  # a sampler may have moved it
        array.size, array.selected, array.sorted = len(self.data), -1, False
        return self

    def apply(self, sampler: llama_cpp.llama_sampler_p) -> Candidates:
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self.array))
        return self

    @property
    def selected(self) -> int:
        return int(self.array.data[self.array.selected].id)


# A refused token's resampling first tries the grammar on this many of the likeliest tokens.
LIKELIEST = 256


class SamplerChain:
    """logit bias and penalties (`pre`), then top-k, typical, top-p, min-p, temperature and dist(seed), or
    greedy (`post`), as the llama.cpp server orders them. Owns its llama.cpp samplers; `free()` releases them.

    A grammar is checked the way llama.cpp's server checks one: the chain picks a token from all of them,
    the grammar checks that one token, and only when it refuses is the pick made again among the tokens the
    grammar allows. That pick tries the LIKELIEST tokens (after `pre`) first: when enough of them are
    allowed (one for greedy, top_k with top_k set), no token outside them could be picked, and the grammar
    need not walk the whole vocabulary, which costs as much as a decode step of a small model."""

    def __init__(
        self, model: LlamaModel, sampling: Sampling, grammar: Grammar | None, window: int, resumed: int = 0
    ) -> None:
        """`resumed`: output tokens an earlier run made (see `replay`); a set seed is advanced by as many."""
        # The grammar first, so that one llama.cpp refuses leaves nothing to free. A lazy one is compiled
        # whole here, to refuse it now rather than at its trigger, and again from where the trigger came.
        self._lazy = grammar if grammar is not None and grammar.trigger else None
        self._grammar = compile_grammar(model, grammar.after("")) if grammar is not None else None
        if self._lazy is not None and self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        self._written = ""  # lazy: the end of the output, where the trigger may be coming
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        self._pre = llama_cpp.llama_sampler_chain_init(params)
        self._post = llama_cpp.llama_sampler_chain_init(params)
        llama_cpp.llama_sampler_chain_add(self.ptr, self._pre)  # the whole chain owns both halves
        llama_cpp.llama_sampler_chain_add(self.ptr, self._post)
        self._freed = False
        # Only a grammar's checks need token arrays of their own: a request without one allocates none.
        self._all = Candidates(model.n_vocab) if grammar is not None else None
        self._likeliest = Candidates(min(LIKELIEST, model.n_vocab)) if grammar is not None else None
        self._one = Candidates(1) if grammar is not None else None
        self._add_logit_bias(model, sampling)
        self._last_n = window if sampling.repeat_last_n < 0 else sampling.repeat_last_n
        self._penalties = self._add_penalties(model, sampling)
        if sampling.temperature <= 0:
            self._enough = 1
            llama_cpp.llama_sampler_chain_add(self._post, llama_cpp.llama_sampler_init_greedy())
            return
        self._enough = sampling.top_k if sampling.top_k > 0 else model.n_vocab + 1
        seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed < 0 else (sampling.seed + resumed) & 0xFFFFFFFF
        for sampler in (
            llama_cpp.llama_sampler_init_top_k(sampling.top_k),
            llama_cpp.llama_sampler_init_typical(sampling.typical_p, 1),
            llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1),
            llama_cpp.llama_sampler_init_temp(sampling.temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ):
            llama_cpp.llama_sampler_chain_add(self._post, sampler)

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
        self._add_pre(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(bias), entries))

    def _add_penalties(self, model: LlamaModel, sampling: Sampling) -> llama_cpp.llama_sampler_p | None:
        strengths = (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty)
        if not self._last_n or strengths == (1, 0, 0):
            return None
        return self._add_pre(llama_cpp.llama_sampler_init_penalties(model.n_vocab, self._last_n, *strengths))

    def _add_pre(self, sampler: llama_cpp.llama_sampler_p) -> llama_cpp.llama_sampler_p:
        llama_cpp.llama_sampler_chain_add(self._pre, sampler)
        return sampler

    def remember_prompt(self, prompt: Sequence[int]) -> None:
        """Let the penalties see the end of the prompt, as llama.cpp's server does (the grammar must not)."""
        if self._penalties is not None:
            for token in prompt[-self._last_n :]:
                llama_cpp.llama_sampler_accept(self._penalties, token)

    def replay(self, model: LlamaModel, tokens: Sequence[int]) -> None:
        """An earlier run's output, as if sampled here: the grammar walks it. (The penalties see it as the end
        of the prompt.)"""
        for token in tokens:
            if self._grammar is not None:
                if not self._allows(self._grammar, token):  # accepting it would abort the process
                    raise InvalidArgument(f"token {token} does not fit the grammar", field="resume.tokens")
                llama_cpp.llama_sampler_accept(self._grammar, token)
            elif self._lazy is not None:
                self._watch(model, token)

    def sample(self, model: LlamaModel, index: int) -> int:
        """Samples and accepts the next token from output `index` of the last decode."""
        grammar, every = self._grammar, self._all
        if grammar is None or every is None:
            token = int(llama_cpp.llama_sampler_sample(self.ptr, model.ctx, index))
            if self._lazy is not None:
                self._watch(model, token)
            return token
        logits = model.logits(index)
        token = every.fill(every.every_id, logits).apply(self.ptr).selected
        if not self._allows(grammar, token):
            picked = self._resample(grammar, every, logits)
            if picked is None:  # the grammar allows nothing (ignore_eos past its end): end the output
                return model.eog_tokens[0] if model.eog_tokens else token
            token = picked
        llama_cpp.llama_sampler_accept(grammar, token)
        llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def _watch(self, model: LlamaModel, token: int) -> None:
        """Lazy grammar: whether the output now holds the trigger and a start of the opening; the grammar
        then holds from what the token wrote of the opening on."""
        lazy = self._lazy
        assert lazy is not None
        self._written += model.piece(token, special=True).decode("utf-8", errors="replace")
        while (at := self._written.find(lazy.trigger)) >= 0:
            written = self._written[at:]
            if lazy.opening.startswith(written):
                self._grammar = compile_grammar(model, lazy.after(written))
                self._lazy, self._written = None, ""
                return
            self._written = self._written[at + 1 :]  # the trigger in prose: look further on
        self._written = self._written[-(len(lazy.trigger) - 1) :] if len(lazy.trigger) > 1 else ""

    def _allows(self, grammar: llama_cpp.llama_sampler_p, token: int) -> bool:
        assert self._one is not None
        return bool(np.isfinite(self._one.fill(token, 0.0).apply(grammar).data["logit"][0]))

    def _resample(
        self, grammar: llama_cpp.llama_sampler_p, every: Candidates, logits: np.ndarray[Any, Any]
    ) -> int | None:
        """The pick among the tokens the grammar allows; None when it allows none."""
        adjusted = every.fill(every.every_id, logits).apply(self._pre).data["logit"]  # pre keeps the order
        likeliest = self._likeliest
        assert likeliest is not None
        size = len(likeliest.data)
        # in vocabulary order, as the full pass sees them: a tie goes to the same token
        ids = np.sort(np.argpartition(adjusted, -size)[-size:]) if size < len(adjusted) else every.every_id
        likeliest.fill(ids, adjusted[ids]).apply(grammar)
        if np.count_nonzero(np.isfinite(likeliest.data["logit"])) >= self._enough:
            return likeliest.apply(self._post).selected
        every.fill(every.every_id, adjusted).apply(grammar)
        if not np.isfinite(every.data["logit"]).any():
            return None
        return every.apply(self._post).selected

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            llama_cpp.llama_sampler_free(self.ptr)
            if self._grammar is not None:
                llama_cpp.llama_sampler_free(self._grammar)


def logprobs(model: LlamaModel, index: int, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the model's own distribution, and the `top` most likely."""
    logits = model.logits(index)
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
