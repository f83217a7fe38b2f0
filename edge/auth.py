"""The edge lets a caller in before a route reads its body: the broker, the one place that knows the tokens,
answers `WhoAmI` for the caller's credentials, so a stranger gets 401 whatever it sends, never a validation
error about a body it was not allowed to send."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import grpc
from fastapi import Request

from edge.broker import BrokerClient, forwarded_metadata
from edge.errors import ApiError
from velesio.v1 import inference_pb2

# Probes need no token (DESIGN.md, Auth); llama.cpp's /health is one too, and so is Ollama's `/` ("Ollama is
# running", which its clients GET to find a server). /docs and /openapi.json are no dialect routes, so the
# gate never sees them.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/health", "/"})
CHECK_TIMEOUT_S = 5.0


class AuthGate:
    """Remembers credentials the broker accepted for `ttl_s`: a hit costs no call. A refusal is never
    remembered, and a remembered credential only skips this early check: the broker still authenticates the
    request itself, so a revoked token is refused there at once."""

    def __init__(self, broker: BrokerClient, ttl_s: float = 10.0, remember: int = 4096) -> None:
        self.broker = broker
        self.ttl_s = ttl_s
        self.remember = remember
        self._accepted: OrderedDict[bytes, float] = OrderedDict()

    async def check(self, request: Request) -> None:
        """Returns when the broker would let the caller in; raises ApiError (UNAUTHENTICATED, or UNAVAILABLE
        when the broker cannot be asked) otherwise."""
        if request.url.path in PUBLIC_PATHS:
            return
        metadata = forwarded_metadata(request)
        credential = next((value for key, value in metadata if key == "authorization"), "")
        key = hashlib.sha256(credential.encode()).digest()
        now = time.monotonic()
        if self._accepted.get(key, 0.0) > now:
            return
        try:
            await self.broker.stub.WhoAmI(
                inference_pb2.WhoAmIRequest(), metadata=metadata, timeout=CHECK_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise ApiError.from_rpc(exc) from None
        self._accepted[key] = now + self.ttl_s
        self._accepted.move_to_end(key)
        while len(self._accepted) > self.remember:
            self._accepted.popitem(last=False)
