"""The llama.cpp library, set up once per process: backend initialised, its log routed into `logging`, and
ways to catch the error text it reports while one call runs on the calling thread."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

import llama_cpp

log = logging.getLogger("llm_worker.llama_cpp")

# ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT. llama.cpp's INFO is chatty (every load prints
# the model's metadata), so it goes to DEBUG here.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_CONT = 5

_setup_lock = threading.Lock()
_stderr_lock = threading.Lock()
_is_set_up = False
_local = threading.local()


def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pending: str = getattr(_local, "pending", "")
    if level != _CONT:
        _local.level = _LEVELS.get(level, logging.DEBUG)
    pending += text.decode("utf-8", errors="replace")
    *lines, pending = pending.split("\n")
    _local.pending = pending
    captured: list[str] | None = getattr(_local, "captured", None)
    for line in lines:
        if not line.strip():
            continue
        log.log(getattr(_local, "level", logging.DEBUG), "%s", line)
        if captured is not None:
            captured.append(line.strip())


_on_log_c = llama_cpp.llama_log_callback(_on_log)  # module-level: llama.cpp keeps the pointer for good


def set_up() -> None:
    global _is_set_up
    with _setup_lock:
        if _is_set_up:
            return
        llama_cpp.llama_log_set(_on_log_c, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _is_set_up = True


@contextlib.contextmanager
def logged_lines() -> Iterator[list[str]]:
    """The lines llama.cpp logs on this thread while the block runs."""
    lines: list[str] = []
    _local.captured = lines
    try:
        yield lines
    finally:
        _local.captured = None


@contextlib.contextmanager
def stderr_lines() -> Iterator[list[str]]:
    """The lines written to file descriptor 2 while the block runs; they still reach stderr afterwards.

    llama.cpp's grammar parser reports syntax errors with fprintf(stderr), not through its log callback,
    so this is the only place its message can be read. Other threads' output in that short window is
    passed through unchanged.
    """
    lines: list[str] = []
    with _stderr_lock, tempfile.TemporaryFile() as spool:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(spool.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            spool.seek(0)
            raw = spool.read()
            if raw:
                os.write(2, raw)
            lines.extend(line for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip())
