"""Continuous batching on the engine thread: one llama.cpp context, one sequence per slot.

Each step builds one batch from the next token of every generating slot plus as much pending prompt as
`n_batch` leaves room for (long prompts are filled in chunks between other slots' decode steps), runs
one llama_decode, and samples every slot whose logits came out. Requests join and leave between steps.

The event loops talk to this thread through `inbox` and get results back through the `Outbox`
(see `mailbox`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llm_worker.detok import TextStream
from llm_worker.llama_model import LlamaConfig, LlamaModel
from llm_worker.mailbox import Call, Cancel, Message, Outbox, Sink, Stop, Submit, settle_threadsafe
from llm_worker.models import ModelLoadError
from llm_worker.sampling import SamplerChain, logprobs
from llm_worker.types import Delta, Finish, Finished, GenerateRequest, TokenLogprob
from mesh.errors import Internal, InvalidArgument, Unavailable, VelesioError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    rid: int
    request: GenerateRequest
    sink: Sink
    prompt: list[int]
    chain: SamplerChain
    text: TextStream
    slot: Slot | None = None
    fed: int = 0  # prompt tokens in the KV cache
    cached: int = 0  # of those, how many came from the prompt cache
    next_token: int | None = None  # sampled, to be decoded in the next step
    generated: int = 0  # output tokens, those an earlier run delivered included
    resumed: int = 0  # of the prompt's tokens, how many an earlier run delivered as output
    lead: str = ""  # text to send before the first new token's
    unreported: list[int] = field(default_factory=list)
    unreported_logprobs: list[TokenLogprob] = field(default_factory=list)
    admitted_at: float = 0.0
    first_token_at: float = 0.0


@dataclass
class StepStats:
    """Where the engine thread's time goes, summed since start: a few clock reads per step, always on."""

    steps: int = 0
    entries: int = 0  # batch entries decoded (prompt tokens and generated tokens)
    loop_s: float = 0.0  # turns of the thread's loop that ran a step: messages in, the step, results out
    step_s: float = 0.0  # the steps themselves: admission, the batch, llama_decode, sampling, detokenising
    decode_s: float = 0.0  # of which llama_decode

    def copy(self) -> StepStats:
        return dataclasses.replace(self)

    def since(self, before: StepStats) -> StepStats:
        """What was counted after `before` (a copy taken earlier)."""
        return StepStats(*(getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)))


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds for seq_id, by position
    session_id: str = ""
    used_at: float = 0.0
    job: Job | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Batcher:
    def __init__(self, config: LlamaConfig) -> None:
        self.config = config
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.outbox = Outbox()
        self.model: LlamaModel | None = None
        self.slots = [Slot(seq_id=i) for i in range(config.slots)]
        self.waiting: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}
        self.n_ctx_seq = 0
        self.stats = StepStats()

    # -- the thread -------------------------------------------------------------------------------------

    def run(self, ready: Callable[[BaseException | None], None]) -> None:
        try:
            self.model = LlamaModel(self.config)
        except ModelLoadError as exc:
            ready(exc)
            return
        except Exception as exc:
            log.exception("loading %s failed", self.config.path)
            ready(ModelLoadError(f"loading {str(self.config.path)!r} failed: {type(exc).__name__}: {exc}"))
            return
        self.n_ctx_seq = self.model.n_ctx_seq
        ready(None)
        clock, stats = time.perf_counter, self.stats
        try:
            while True:
                idle = not self._has_work()
                began = clock()
                if not self._receive(block=idle):
                    break
                if not self._has_work():
                    self.outbox.flush()
                    continue
                if idle:
                    began = clock()  # the wait for work is not the engine's time
                stepped = clock()
                self._step_safely()
                step_s = clock() - stepped
                self.outbox.flush()
                stats.step_s += step_s
                stats.loop_s += clock() - began
                stats.steps += 1
        finally:
            self._shutdown()

    def _has_work(self) -> bool:
        busy = any(slot.job is not None for slot in self.slots)
        return busy or (bool(self.waiting) and any(slot.job is None for slot in self.slots))

    def _receive(self, block: bool) -> bool:
        """Handles what the event loops sent; False on Stop."""
        messages = [self.inbox.get()] if block else []
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        stop = False
        for message in messages:
            if isinstance(message, Stop):
                stop = True
                continue
            try:
                if isinstance(message, Submit):
                    self._submit(message)
                elif isinstance(message, Cancel):
                    self._cancel(message.rid)
                else:
                    self._call(message)
            except Exception:
                log.exception("handling %s failed", type(message).__name__)
                if isinstance(message, Submit):
                    self.outbox.put(message.sink, Internal("the text engine failed to take the request"))
        return not stop

    def _call(self, call: Call) -> None:
        assert self.model is not None
        try:
            result, error = call.fn(self.model), None
        except Exception as exc:
            result, error = None, exc
        settle_threadsafe(call.loop, call.future, result, error)

    def _shutdown(self) -> None:
        for job in list(self.jobs.values()):
            self.outbox.put(job.sink, Unavailable("the text engine stopped"))
            job.chain.free()
        self.jobs.clear()
        self.outbox.flush()
        while True:  # answer calls that arrived after Stop, so nobody waits forever
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, Call):
                settle_threadsafe(message.loop, message.future, None, Unavailable("the text engine stopped"))
            elif isinstance(message, Submit):
                self.outbox.put(message.sink, Unavailable("the text engine stopped"))
        self.outbox.flush()
        if self.model is not None:
            self.model.close()

    # -- requests join and leave --------------------------------------------------------------------------

    def _submit(self, message: Submit) -> None:
        model = self.model
        assert model is not None
        try:
            # A chat template that writes the BOS token itself must not get a second one.
            add_special = not (
                message.is_chat and model.bos_text and message.prompt.startswith(model.bos_text)
            )
            prompt = model.tokenize(message.prompt, add_special=add_special, parse_special=True)
            if not prompt:
                raise InvalidArgument("the prompt is empty", field="prompt")
            resumed = list(model.checked(message.request.resume_tokens, "resume.tokens"))
            if resumed and len(prompt) + len(resumed) >= self.n_ctx_seq:  # it had filled the context
                self.outbox.put(
                    message.sink, Finished(Finish.LENGTH, len(prompt), len(resumed), cached_tokens=0)
                )
                return
            prompt += resumed  # an earlier run's output: fed like the prompt, counted as output
            if len(prompt) >= self.n_ctx_seq:
                raise InvalidArgument(
                    f"the prompt is {len(prompt)} tokens; a request may use at most {self.n_ctx_seq - 1} "
                    f"(context {self.n_ctx_seq} tokens per slot: --ctx-size {model.context.tokens} / "
                    f"--slots {self.config.slots}, less one token to generate)",
                    field="prompt",
                )
            model.checked([token for token, _ in message.request.sampling.logit_bias], "sampling.logit_bias")
            chain = SamplerChain(
                model, message.request.sampling, message.grammar, self.n_ctx_seq, resumed=len(resumed)
            )
            try:
                chain.replay(model, resumed)
            except VelesioError:
                chain.free()
                raise
        except VelesioError as exc:
            self.outbox.put(message.sink, exc)
            return
        job = Job(
            message.rid,
            message.request,
            message.sink,
            prompt,
            chain,
            TextStream(message.request.sampling.stop),
            generated=len(resumed),
            resumed=len(resumed),
        )
        if resumed:
            # The text stream as the earlier run left it: what it released of these tokens was delivered;
            # what it held back (a possible stop string, part of a character) still is, and comes first.
            released = "".join(job.text.push(model.piece(t)) for t in resumed)
            told = message.request.resume_text
            if not released.startswith(told):
                chain.free()
                self.outbox.put(
                    message.sink,
                    InvalidArgument(
                        "the delivered text is not what the delivered tokens make", field="resume"
                    ),
                )
                return
            job.lead = released[len(told) :]
        self.jobs[job.rid] = job
        self.waiting.append(job)

    def _cancel(self, rid: int) -> None:
        job = self.jobs.get(rid)
        if job is None:
            return  # it finished before the cancel arrived
        if job.slot is None:
            self.waiting.remove(job)
            self._drop(job)
        else:
            self._release(job)

    def _drop(self, job: Job) -> None:
        job.chain.free()
        del self.jobs[job.rid]

    def _choose_slot(self, job: Job) -> Slot:
        free = [slot for slot in self.slots if slot.job is None]
        if not job.request.cache_prompt:
            return min(free, key=lambda s: s.used_at)
        if job.request.session_id:
            for slot in free:
                if slot.session_id == job.request.session_id:
                    return slot
        return max(free, key=lambda s: (common_prefix(s.tokens, job.prompt), -s.used_at))

    def _admit(self, job: Job, slot: Slot) -> None:
        model = self.model
        assert model is not None
        keep = common_prefix(slot.tokens, job.prompt) if job.request.cache_prompt else 0
        keep = min(keep, len(job.prompt) - 1)  # the last prompt token is always decoded, for its logits
        if keep < len(slot.tokens):
            if not model.forget(slot.seq_id, keep):
                model.forget(slot.seq_id, 0)
                keep = 0
            del slot.tokens[keep:]
        job.fed = job.cached = keep
        job.slot, slot.job = slot, job
        slot.session_id = job.request.session_id
        job.admitted_at = slot.used_at = time.perf_counter()
        job.chain.remember_prompt(job.prompt)

    def _release(self, job: Job, drop_cache: bool = False) -> None:
        """Frees the job's slot at once; its KV cells stay as a prompt cache only when the job allows it."""
        slot = job.slot
        assert slot is not None
        assert self.model is not None
        if drop_cache or not job.request.cache_prompt:
            self.model.forget(slot.seq_id, 0)
            slot.tokens.clear()
        slot.job, job.slot = None, None
        slot.used_at = time.perf_counter()
        self._drop(job)

    # -- one step -----------------------------------------------------------------------------------------

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception:
            log.exception("a decode step failed; ending the requests it carried")
            for slot in self.slots:
                if slot.job is not None:
                    job = slot.job
                    self.outbox.put(job.sink, Internal("the text engine failed a decode step; see its log"))
                    self._release(job, drop_cache=True)

    def _step(self) -> None:
        model = self.model
        assert model is not None
        while self.waiting and any(slot.job is None for slot in self.slots):
            job = self.waiting.popleft()
            self._admit(job, self._choose_slot(job))
        entries, fed, outputs = self._plan()
        if not entries:
            return
        decoding = time.perf_counter()
        code = model.decode(entries)
        if code == 1 and self._evict_idle_caches():
            code = model.decode(entries)
        self.stats.decode_s += time.perf_counter() - decoding
        self.stats.entries += len(entries)
        if code != 0:
            for job in fed:
                self.outbox.put(job.sink, Unavailable(f"llama_decode failed (code {code}); try again"))
                self._release(job, drop_cache=True)
            return
        for job, tokens in fed.items():
            assert job.slot is not None
            job.slot.tokens.extend(tokens)
            if job.next_token is None:
                job.fed += len(tokens)
            job.next_token = None
        for job, index in outputs:
            self._sample(job, index)

    def _plan(self) -> tuple[list[tuple[int, int, int, bool]], dict[Job, list[int]], list[tuple[Job, int]]]:
        """The batch: each generating slot's next token first, then prompt chunks in order of arrival."""
        assert self.model is not None
        entries: list[tuple[int, int, int, bool]] = []
        fed: dict[Job, list[int]] = {}
        outputs: list[tuple[Job, int]] = []
        active = [slot.job for slot in self.slots if slot.job is not None]
        for job in active:
            if job.next_token is not None:
                assert job.slot is not None
                outputs.append((job, len(entries)))
                entries.append((job.next_token, len(job.slot.tokens), job.slot.seq_id, True))
                fed[job] = [job.next_token]
        prompt_room = self.config.prefill_chunk or self.model.n_batch
        for job in sorted((j for j in active if j.next_token is None), key=lambda j: j.admitted_at):
            room = min(self.model.n_batch - len(entries), prompt_room)
            if room <= 0:
                break
            assert job.slot is not None
            chunk = job.prompt[job.fed : job.fed + room]
            last = job.fed + len(chunk) == len(job.prompt)
            start = len(job.slot.tokens)
            for offset, token in enumerate(chunk):
                entries.append((token, start + offset, job.slot.seq_id, last and offset == len(chunk) - 1))
            if last:
                outputs.append((job, len(entries) - 1))
            fed[job] = chunk
            prompt_room -= len(chunk)
        return entries, fed, outputs

    def _evict_idle_caches(self) -> bool:
        assert self.model is not None
        evicted = False
        for slot in self.slots:
            if slot.job is None and slot.tokens:
                self.model.forget(slot.seq_id, 0)
                slot.tokens.clear()
                evicted = True
        return evicted

    def _sample(self, job: Job, index: int) -> None:
        model = self.model
        assert model is not None
        assert job.slot is not None
        sampling = job.request.sampling
        if not job.first_token_at:
            job.first_token_at = time.perf_counter()
        if job.resumed and job.text.stopped_by:  # resumed after the stop string was made, before the end
            self._report(job, job.lead)
            self._finish(job, Finish.STOP_SEQUENCE)
            return
        if sampling.max_tokens == 0 or 0 < sampling.max_tokens <= job.generated:  # (resumed at the limit)
            self._finish(job, Finish.LENGTH)
            return
        token = job.chain.sample(model, index)
        if model.is_eog(token):
            self._finish(job, Finish.STOP)
            return
        job.generated += 1
        job.unreported.append(token)
        if sampling.logprobs > 0:
            job.unreported_logprobs.append(logprobs(model, index, token, sampling.logprobs))
        text, job.lead = job.lead + job.text.push(model.piece(token)), ""
        if job.text.stopped_by:
            self._report(job, text)
            self._finish(job, Finish.STOP_SEQUENCE)
        elif 0 < sampling.max_tokens <= job.generated or len(job.slot.tokens) >= self.n_ctx_seq:
            self._report(job, text)
            self._finish(job, Finish.LENGTH)
        else:
            if text:
                self._report(job, text)
            job.next_token = token

    def _report(self, job: Job, text: str) -> None:
        if text or job.unreported:
            self.outbox.put(job.sink, Delta(text, tuple(job.unreported), tuple(job.unreported_logprobs)))
            job.unreported, job.unreported_logprobs = [], []

    def _finish(self, job: Job, reason: Finish) -> None:
        if reason is not Finish.STOP_SEQUENCE:
            self._report(job, job.lead + job.text.flush())
            job.lead = ""
        now = time.perf_counter()
        done = Finished(
            reason=reason,
            prompt_tokens=len(job.prompt) - job.resumed,
            completion_tokens=job.generated,
            cached_tokens=min(job.cached, len(job.prompt) - job.resumed),
            prompt_ms=(job.first_token_at - job.admitted_at) * 1000,
            predicted_ms=(now - job.first_token_at) * 1000,
            stopping_word=job.text.stopped_by,
        )
        self._release(job)  # the slot is free before the client hears "done"
        self.outbox.put(job.sink, done)
