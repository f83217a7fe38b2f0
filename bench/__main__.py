"""`python -m bench` (`make bench`): every benchmark, one after another on this machine, in one run; then
one Markdown table and one PNG chart of all their figures against their peers and the DESIGN.md targets,
with the machine and the versions (bench/results/latest.md, latest.png; raw figures in latest.json).

    python -m bench            # the full profile: what bench/results/latest.md is committed from
    python -m bench --quick    # a short run of everything, to check that it all works (quick.md, ...)

Each benchmark also runs alone: `python -m bench.<name> --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import edge_overhead, embeddings, llm_throughput, load, mesh_overhead, tool_calls
from bench.report import (
    REPO_ROOT,
    Outcome,
    Result,
    Target,
    callers,
    machine,
    outcomes_from_json,
    paired,
    write_chart,
    write_markdown,
)

Runner = Callable[[list[str]], Outcome]

# name -> (arguments of the quick profile, of the full profile)
PROFILES: dict[str, tuple[str, str]] = {
    "mesh_overhead": ("--duration 1 --warmup 0.3 --repeats 2 --concurrency 1,8 --pause 0.1", ""),
    "edge_overhead": ("--duration 1 --warmup 0.3 --repeats 2 --concurrency 1,8 --pause 0.1", ""),
    "load": ("--sse 50 --grpc 50 --hold 5 --ramp 1 --jobs 1000 --position-calls 50", ""),
    "llm_throughput": ("--concurrency 1,8 --max-tokens 16 --repeats 2", ""),
    "embeddings": ("--inputs 32 --repeats 2", ""),
    "tool_calls": ("--repeats 2 --max-tokens 48", ""),
    "image_throughput": ("--images 2 --repeats 2 --steps 4 --concurrency 1", "--repeats 3"),
}


def _image(argv: list[str]) -> Outcome:
    """bench.image_throughput has no entry that takes argv and returns figures: it runs as a child process
    (its in-process peer, torch, then stays out of this one) and the JSON it prints is read back."""
    from bench import image_throughput

    command = [sys.executable, "-m", "bench.image_throughput", *argv]
    done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, check=False)
    print(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"python -m bench.image_throughput exited with {done.returncode}")
    found, _ = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{") :])
    images = int(found["images_per_repeat"])
    value, peer, ratio, added = paired(
        [
            (images * 60 / stack, images * 60 / peer)
            for stack, peer in zip(found["stack_seconds"], found["peer_seconds"], strict=True)
        ]
    )
    result = Result(
        "image_throughput",
        f"{found['size']} images, {found['steps']} steps, {found['sampler']}, "
        f"{callers(int(found['concurrency']))}",
        "images/min",
        value,
        peer="the same diffusers pipeline in-process",
        peer_value=peer,
        ratio=ratio,
        added=added,
        target=Target("ratio", ">=", image_throughput.TARGET_RATIO),
    )
    details = ["## Velesio image throughput", "", *(f"- {key}: {value}" for key, value in found.items())]
    return Outcome("image_throughput", [result], "\n".join(details))


BENCHMARKS: dict[str, Runner] = {
    "mesh_overhead": mesh_overhead.run,
    "edge_overhead": edge_overhead.run,
    "load": load.run,
    "llm_throughput": llm_throughput.run,
    "embeddings": embeddings.run,
    "tool_calls": tool_calls.run,
    "image_throughput": _image,
}


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Run every benchmark one after another on this machine and write one Markdown table and one "
            "PNG chart of their figures, peers, ratios and DESIGN.md targets. The full profile takes a "
            "while (the load benchmark alone holds its streams for a minute); --quick checks that all works."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short runs (the figures mean little)")
    parser.add_argument(
        "--only", type=_names, default=",".join(BENCHMARKS), help="comma-separated benchmarks"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "results", help="folder to write to"
    )
    parser.add_argument(
        "--name", default=None, help="file name of the report, without suffix (None: latest, or quick)"
    )
    parser.add_argument(
        "--redraw", action="store_true", help="run nothing: draw the chart again from the report's .json"
    )
    args = parser.parse_args(argv)
    args.name = args.name or ("quick" if args.quick else "latest")
    return args


def run_all(names: Sequence[str], quick: bool) -> tuple[list[Outcome], dict[str, str], dict[str, float]]:
    outcomes: list[Outcome] = []
    failures: dict[str, str] = {}
    took: dict[str, float] = {}
    for name in names:
        argv = PROFILES[name][0 if quick else 1].split()
        print(f"\n=== {name} {' '.join(argv)}", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            outcomes.append(BENCHMARKS[name](list(argv)))
        except KeyboardInterrupt:
            failures[name] = "interrupted"
            raise
        except (Exception, SystemExit) as exc:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}"
        finally:
            took[name] = time.monotonic() - began
    return outcomes, failures, took


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = "quick" if args.quick else "full"
    if args.redraw:
        raw_path = args.out / f"{args.name}.json"
        raw = json.loads(raw_path.read_text())
        title = f"Velesio benchmarks ({raw['profile']}), {raw['machine']['cpu']}"
        write_chart(raw_path.with_suffix(".png"), outcomes_from_json(raw), title)
        print(f"wrote {raw_path.with_suffix('.png')}", file=sys.stderr)
        return 0
    signal.signal(signal.SIGTERM, mesh_overhead._interrupt)
    info = machine()
    info["redis-server"] = mesh_overhead.redis_version()
    outcomes: list[Outcome] = []
    failures: dict[str, str] = {}
    took: dict[str, float] = {}
    interrupted = False
    try:
        outcomes, failures, took = run_all(args.only, args.quick)
    except KeyboardInterrupt:
        interrupted = True
    info["run time"] = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took.items())
    markdown = args.out / f"{args.name}.md"
    write_markdown(markdown, outcomes, failures, info, profile)
    write_chart(markdown.with_suffix(".png"), outcomes, f"Velesio benchmarks ({profile}), {info['cpu']}")
    raw = {
        "profile": profile,
        "machine": info,
        "failures": failures,
        "results": [dataclasses.asdict(r) for o in outcomes for r in o.results],
        "memory_mib": next((o.memory_mib for o in outcomes if o.memory_mib), {}),
    }
    markdown.with_suffix(".json").write_text(json.dumps(raw, indent=1, allow_nan=True) + "\n")
    print(f"\nwrote {markdown} and {markdown.with_suffix('.png').name}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
