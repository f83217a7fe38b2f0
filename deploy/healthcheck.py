#!/usr/bin/env python3
"""Health check of a Velesio container (the images' HEALTHCHECK): exits 0 when healthy, else 1.

    velesio-healthcheck [TARGET ...]     TARGET: grpc://HOST:PORT or http://HOST:PORT/PATH
    velesio-healthcheck --pid PID        check one velesio process

`grpc://` asks `grpc.health.v1.Health/Check` and wants SERVING; `http://` wants a 200. Without targets it
finds the `velesio <command>` processes in /proc and checks what each serves, from its flags and its
VELESIO_* environment: the broker's gRPC port, the edge's /healthz, a worker's gRPC port (`velesio up` is
checked through its children). A worker on port 0 (any free port) can only be seen to be alive.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

TIMEOUT_S = 4.0
WILDCARDS = ("", "0.0.0.0", "::", "[::]")
# command -> (scheme, option naming its port, default port, path)
SERVES = {
    "broker": ("grpc", "grpc_port", 50051, ""),
    "edge": ("http", "http_port", 8000, "/healthz"),
    "llm-worker": ("grpc", "port", 0, ""),
    "sd-worker": ("grpc", "port", 0, ""),
}


def check_grpc(address: str) -> str | None:
    """None when `address` answers SERVING, else what is wrong."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name} {exc.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return None


def check_http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except OSError as exc:
        return str(exc)


def check(target: str) -> str | None:
    scheme, _, rest = target.partition("://")
    if scheme == "grpc":
        return check_grpc(rest)
    if scheme in ("http", "https"):
        return check_http(target)
    return f"unknown target scheme {scheme!r} (grpc:// or http://)"


def option(argv: Sequence[str], environ: Mapping[str, str], name: str) -> str | None:
    """The value of `--name` in `argv` (the flag wins), else of VELESIO_NAME in `environ`."""
    flag = "--" + name.replace("_", "-")
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return environ.get(f"VELESIO_{name.upper()}")


def command_of(argv: Sequence[str]) -> str | None:
    """`broker` for `.../velesio broker ...` or `python -m launcher.cli broker ...`; None for the rest."""
    for i, arg in enumerate(argv[:-1]):
        if Path(arg).name == "velesio" or arg == "launcher.cli":
            return argv[i + 1]
    return None


def targets_of(argv: Sequence[str], environ: Mapping[str, str]) -> list[str] | None:
    """What a process serves, as targets; None when it is not a velesio process."""
    command = command_of(argv)
    if command is None:
        return None
    if command not in SERVES:
        return []
    scheme, port_option, default_port, path = SERVES[command]
    port = int(option(argv, environ, port_option) or default_port)
    if port == 0:
        return []
    host = option(argv, environ, "host") or "127.0.0.1"
    host = "127.0.0.1" if host in WILDCARDS else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return [f"{scheme}://{host}:{port}{path}"]


def read_process(pid: int) -> tuple[list[str], dict[str, str]]:
    proc = Path("/proc") / str(pid)
    argv = [a.decode(errors="replace") for a in proc.joinpath("cmdline").read_bytes().split(b"\0") if a]
    environ: dict[str, str] = {}
    for entry in proc.joinpath("environ").read_bytes().split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            environ[key] = value
    return argv, environ


def discover(pids: Sequence[int]) -> list[str] | None:
    """Targets of the velesio processes among `pids`; None when none of them is one."""
    found: list[str] | None = None
    for pid in pids:
        try:
            argv, environ = read_process(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        targets = targets_of(argv, environ)
        if targets is not None:
            found = (found or []) + targets
    return found


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="velesio-healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET")
    parser.add_argument("--pid", type=int, action="append", help="check this process (default: all)")
    ns = parser.parse_args(args)
    targets: list[str] | None = ns.targets
    if not targets:
        pids = ns.pid or sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
        targets = discover(pids)
        if targets is None:
            print("unhealthy: no velesio process found", file=sys.stderr)
            return 1
    problems = [f"{target}: {problem}" for target in targets if (problem := check(target))]
    for line in problems:
        print(f"unhealthy: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
