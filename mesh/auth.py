"""API tokens: `tenant:token` pairs (or plain tokens, all of tenant "default"), from a flag or a file."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

ANONYMOUS = "anonymous"
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Tokens:
    """Known tokens, kept as SHA-256 digests; `tenant_for` compares against all of them in constant time."""

    entries: tuple[tuple[bytes, str], ...] = ()

    @classmethod
    def parse(cls, spec: str = "", file: Path | None = None) -> Tokens:
        items = [s.strip() for s in spec.split(",")]
        if file is not None:
            lines = file.read_text().splitlines()
            items += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        entries = []
        for item in filter(None, items):
            tenant, sep, token = item.rpartition(":")
            if not sep:
                tenant = DEFAULT_TENANT
            if not token or (sep and not tenant):
                raise ValueError("API tokens are 'tenant:token' or 'token', comma-separated")
            entries.append((hashlib.sha256(token.encode()).digest(), tenant))
        return cls(tuple(entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def tenant_for(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for known, tenant in self.entries:  # no early exit: every token costs the same
            if hmac.compare_digest(digest, known):
                found = tenant
        return found
