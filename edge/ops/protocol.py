"""What the probes answer."""

from __future__ import annotations

from typing import Literal

from edge.wire import Reply


class Liveness(Reply):
    status: Literal["ok"] = "ok"


class Readiness(Reply):
    """Ready: the broker answers and at least one worker serves (503 with the same body otherwise)."""

    status: Literal["ready", "not ready"]
    broker: bool
    text: bool
    image: bool
