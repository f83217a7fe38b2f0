"""Starting `velesio` processes: the one way the launcher, the benchmarks and the tests do it.

`velesio_argv` builds a command line from option names checked against the command's settings class (a
misspelt option fails here, not as a child that exits with a usage line); `spawn` and `spawn_async`
start it with its output in a log file, stdin closed, an environment without the caller's `VELESIO_*`
settings, and, when asked, SIGTERM from the kernel should the parent die without stopping it.

`die_with_parent` runs code between fork() and exec(). Ask for it only where the caller's other threads
hold no locks a child could need there: `velesio up` starts no threads at all; the tests run gRPC servers
in-process and do not ask (with it, a drill's worker once died of SIGSEGV before exec).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from launcher.cli import COMMANDS, _is_bool, _load


def velesio_command() -> list[str]:
    """The `velesio` console script of this interpreter's environment, else `python -m launcher.cli`."""
    script = Path(sys.executable).with_name("velesio")
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher.cli"]


@functools.cache
def _fields(command: str) -> dict[str, bool]:
    """Option name -> whether it is a --x / --no-x switch, for `velesio <command>`."""
    found = next((c for c in COMMANDS if c.name == command), None)
    if found is None:
        raise ValueError(f"no velesio command {command!r}; there are {', '.join(c.name for c in COMMANDS)}")
    settings = _load(found.settings)
    return {name: _is_bool(info.annotation) for name, info in settings.model_fields.items()}


def velesio_argv(command: str, **options: object) -> list[str]:
    """`velesio <command> --option value ...`; options by their settings field names (grpc_port=...)."""
    fields = _fields(command)
    argv = [*velesio_command(), command]
    for name, value in options.items():
        if name not in fields:
            raise ValueError(f"velesio {command} has no option {name!r}")
        flag = "--" + name.replace("_", "-")
        if fields[name]:
            argv.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            argv += [flag, str(value)]
    return argv


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment less every `VELESIO_*` setting, plus `extra`: a child takes its options
    from its command line, not from whatever the caller's shell exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VELESIO_")}
    return env | dict(extra or {})


@functools.cache
def die_with_parent() -> Callable[[], None] | None:
    """A preexec function that has the kernel send the child SIGTERM when this process dies (Linux); it
    only calls prctl(), which is safe between fork() and exec()."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclass
class _Logged:
    """A started process's name and log file (the process itself is the subclass's)."""

    name: str
    log: Path
    _out: IO[bytes] | None = field(default=None, repr=False)

    def log_text(self, chars: int = 0) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:] if chars else text

    def _close_log(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


@dataclass
class Spawned(_Logged):
    """A process started by `spawn`, and its log file."""

    process: subprocess.Popen[bytes] = field(kw_only=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; the exit code."""
        if self.alive():
            self.process.terminate()
        try:
            code = self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(5)
        self._close_log()
        return code


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    new_session: bool = False,
    with_parent: bool = False,
) -> Spawned:
    """Starts `argv` with stdout and stderr in `log`. `new_session`: Ctrl-C in a terminal reaches only the
    caller, which then stops its children in its own order. `with_parent`: `die_with_parent`."""
    out = log.open("wb")
    process = popen(argv, env=env, cwd=cwd, out=out, new_session=new_session, with_parent=with_parent)
    return Spawned(name, log, out, process=process)


def popen(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    out: IO[bytes] | None = None,
    new_session: bool = False,
    new_group: bool = False,
    with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """The one place a process starts: stdin closed, stdout and stderr into `out` (this process's own when
    None), a clean environment unless `env` is given; `new_group` gives it a process group of its own (so a
    supervisor signals it and its children alone)."""
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
        start_new_session=new_session,
        process_group=0 if new_group else None,
        preexec_fn=die_with_parent() if with_parent else None,
    )


@dataclass
class AsyncSpawned(_Logged):
    """A process started by `spawn_async`, and its log file."""

    process: asyncio.subprocess.Process = field(kw_only=True)

    def alive(self) -> bool:
        return self.process.returncode is None

    async def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
        try:
            code = await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            code = await self.process.wait()
        self._close_log()
        return code


async def spawn_async(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    with_parent: bool = False,
) -> AsyncSpawned:
    """`spawn` for an event loop: the same log, environment and parent-death signal when asked."""
    out = log.open("wb")
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env) if env is not None else clean_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=out,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent() if with_parent else None,
    )
    return AsyncSpawned(name, log, out, process=process)
