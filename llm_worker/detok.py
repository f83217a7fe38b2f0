"""From token bytes to text that is safe to stream: whole UTF-8 characters only, never a stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Takes each generated token's bytes and returns the text that may be emitted now.

    A multi-byte character split across tokens is held until it is complete; text that could be the
    start of a stop string is held until it is known not to be one. When a stop string appears,
    `stopped_by` is set and only the text before it is returned.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped_by = ""

    def push(self, raw: bytes) -> str:
        self._held += self._decoder.decode(raw)
        return self._release()

    def flush(self) -> str:
        """Everything still held, at the end of generation (a dangling partial character becomes U+FFFD)."""
        self._held += self._decoder.decode(b"", final=True)
        out = self._release()
        if not self.stopped_by:
            out, self._held = out + self._held, ""
        return out

    def _release(self) -> str:
        hit = self._first_stop()
        if hit is not None:
            at, self.stopped_by = hit
            out, self._held = self._held[:at], ""
            return out
        cut = len(self._held) - self._stop_prefix_length()
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def _first_stop(self) -> tuple[int, str] | None:
        found = [(at, -len(stop), stop) for stop in self._stops if (at := self._held.find(stop)) >= 0]
        if not found:
            return None
        at, _, stop = min(found)
        return at, stop

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that a stop string starts with."""
        return max((partial_suffix(self._held, stop) for stop in self._stops), default=0)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`: what to hold back in case the
    next text completes it."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
