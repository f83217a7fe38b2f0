"""A worker's job slots: how many jobs it runs at once, and the refusal when all are taken."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from mesh.errors import ResourceExhausted


class Slots:
    """`total` slots. `claim()` takes one or refuses with RESOURCE_EXHAUSTED (the broker then tries
    another worker); `on_change(busy)` hears every change, e.g. the worker's slot gauge."""

    def __init__(self, total: int, on_change: Callable[[int], None] = lambda busy: None) -> None:
        self.total = total
        self.busy = 0
        self._on_change = on_change
        on_change(0)

    def claim(self) -> Claim:
        if self.busy >= self.total:
            raise ResourceExhausted(f"all {self.total} slots are busy", retry_after=1)
        self._changed(+1)
        return Claim(self)

    def _changed(self, by: int) -> None:
        self.busy += by
        self._on_change(self.busy)


class Claim:
    """One taken slot, given back once: by `release()` as soon as the job's result is on its way (so the
    broker may send the next job at once), else when the `with` block ends however it ends."""

    def __init__(self, slots: Slots) -> None:
        self._slots: Slots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots._changed(-1)
            self._slots = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
