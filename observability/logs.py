"""Logging set-up, called once from a process's main(), and the job context every log line carries.

Each record gets `trace_id` (the active span's) and `job_id` / `tenant` (set with `job_context` where a
job is handled), so a job's lines can be found across processes; JSON output keeps them as fields.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

from opentelemetry import trace

# Attributes a LogRecord always has; anything else was passed in `extra=` and is context worth keeping.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_CONTEXT = ("job_id", "tenant", "trace_id")
_job: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("velesio_job", default=("", ""))


@contextlib.contextmanager
def job_context(job_id: str, tenant: str = "") -> Iterator[None]:
    """Log lines written inside carry this job's id and tenant."""
    token = _job.set((job_id, tenant))
    try:
        yield
    finally:
        _job.reset(token)


def set_job_context(job_id: str, tenant: str = "") -> None:
    """For a task that handles one job for its whole life (its context copy ends with it)."""
    _job.set((job_id, tenant))


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job_id, tenant = _job.get()
        if job_id and not getattr(record, "job_id", ""):
            record.job_id = job_id
        if tenant and not getattr(record, "tenant", ""):
            record.tenant = tenant
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with the job context appended when a line has one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in _CONTEXT if getattr(record, k, ""))
        return f"{line} [{context}]" if context else line


def configure_logging(level: str = "INFO", log_format: str = "text", process: str = "velesio") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
