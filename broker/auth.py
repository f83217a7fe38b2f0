"""The one place where a caller becomes a tenant: the bearer token in the call's metadata."""

from __future__ import annotations

from mesh.auth import ANONYMOUS, Tokens
from mesh.errors import Unauthenticated
from mesh.server import Context


class Authenticator:
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def tenant(self, context: Context) -> str:
        """The caller's tenant; UNAUTHENTICATED without a valid token when tokens are configured."""
        if not self.tokens:
            return ANONYMOUS
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if not values:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = str(values[0]).strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        tenant = self.tokens.tenant_for(token.strip())
        if tenant is None:
            raise Unauthenticated("invalid API token")
        return tenant
