"""What a worker records about each job it runs: spans for its phases and the per-token / per-step
metrics. The servicer calls these as its engine's events pass by; the spans are children of the worker's
call span and are built afterwards from the measured times (the engine runs on its own thread)."""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace

from observability import metrics
from observability.tracing import ns, tracer


def slot_gauges(kind: str, model: str, total: int) -> Callable[[int], None]:
    """Sets the worker's slots-total gauge; the function it returns sets slots-busy (`mesh.slots.Slots`
    calls it on every change). Labelled by kind and model."""
    labels = {"kind": kind, "model": model}
    metrics.slots_total.set(total, labels)
    return lambda busy: metrics.slots_busy.set(busy, labels)


class TextJobTelemetry:
    """One text job: "prompt processing" until the first token, then "generation"."""

    def __init__(self, model: str, component: str = "velesio.llm_worker") -> None:
        self.tracer = tracer(component)
        self.labels = {"model": model}
        self.started = time.time()
        self.first: float | None = None
        self.last = self.started

    def tokens(self, count: int) -> None:
        """`count` tokens (one streamed delta) arrived now."""
        now = time.time()
        if self.first is None:
            self.first = now
            metrics.prompt_duration.record(now - self.started, self.labels)
            _phase(self.tracer, "prompt processing", self.started, now, self.labels)
        elif count > 0:
            gap = (now - self.last) / count
            for _ in range(count):
                metrics.inter_token_latency.record(gap, self.labels)
        if count > 0:
            self.last = now
            # Counted as they stream, so that cancelled and failed jobs' tokens count too.
            metrics.tokens_generated.add(count, self.labels)

    def finished(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        now = time.time()
        metrics.prompt_tokens.add(prompt_tokens, self.labels)
        attributes = {
            "velesio.prompt_tokens": prompt_tokens,
            "velesio.completion_tokens": completion_tokens,
            "velesio.cached_tokens": cached_tokens,
        }
        trace.get_current_span().set_attributes(attributes)
        if self.first is None:
            _phase(self.tracer, "prompt processing", self.started, now, self.labels)
        else:
            _phase(self.tracer, "generation", self.first, now, self.labels, attributes)


class ImageJobTelemetry:
    """One image job: "denoising" until its last step, then "decode" (VAE decode and PNG encoding)."""

    def __init__(self, model: str, component: str = "velesio.sd_worker") -> None:
        self.tracer = tracer(component)
        self.labels = {"model": model}
        self.started = time.time()
        self.last = self.started
        self.last_step = 0
        self.steps = 0
        self.denoise_started = 0.0

    def step(self, step: int) -> None:
        """The denoising loop reached `step` (1-based, counting on across batches)."""
        now = time.time()
        if step < self.last_step:  # a new batch restarts the count
            self.last_step = 0
        if self.last_step == 0:
            # The first report of a batch follows prompt encoding (and a model switch): no step time.
            self.denoise_started = self.denoise_started or now
        else:
            gap = (now - self.last) / max(1, step - self.last_step)
            for _ in range(step - self.last_step):
                metrics.image_step_duration.record(gap, self.labels)
        self.steps += step - self.last_step
        self.last_step = step
        self.last = now

    def finished(self, images: int) -> None:
        now = time.time()
        metrics.images_generated.add(images, self.labels)
        attributes = {"velesio.steps": self.steps, "velesio.images": images}
        trace.get_current_span().set_attributes(attributes)
        began = self.denoise_started or self.started
        _phase(self.tracer, "denoising", began, self.last, self.labels, attributes)
        _phase(self.tracer, "decode", self.last, now, self.labels)


def _phase(
    tracer_: trace.Tracer,
    name: str,
    start: float,
    end: float,
    labels: dict[str, str],
    attributes: dict[str, int] | None = None,
) -> None:
    span = tracer_.start_span(name, start_time=ns(start), attributes={"velesio.model": labels["model"]})
    span.set_attributes(attributes or {})
    span.end(end_time=ns(end))
