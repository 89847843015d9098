"""API keys and tenants: `Authorization: Bearer <key>` names the tenant of every request.

Keys come from `FACEPARSE_API_KEYS` (`tenant:key,...`). They are compared in constant time and never
logged. With no keys configured auth is off: every request is `ANONYMOUS_TENANT`, and the app warns
once, loudly, at start-up.
"""

from __future__ import annotations

import hmac

import structlog
from flask import g, request

from storage.errors import Unauthorized
from storage.jobs import ANONYMOUS_TENANT

log = structlog.get_logger(__name__)


class ApiKeys:
    """The configured keys; `tenant_for(header)` answers who is calling."""

    def __init__(self, tenant_keys: dict[str, str]) -> None:
        # Encoded once: compare_digest wants bytes (or ASCII str) of any content.
        self._keys = [(key.encode(), tenant) for key, tenant in tenant_keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def warn_if_disabled(self) -> None:
        """Log the loud warning that auth is off (called once per app)."""
        if not self.enabled:
            log.warning(
                "AUTH IS OFF: FACEPARSE_API_KEYS is empty, every request is served as tenant "
                f"{ANONYMOUS_TENANT!r}; set FACEPARSE_API_KEYS=tenant:key,... before exposing this API"
            )

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of an `Authorization` header; raises Unauthorized when missing or unknown."""
        if not self.enabled:
            return ANONYMOUS_TENANT
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        candidate = token.strip().encode()
        found: str | None = None
        # Compare against every key, without stopping early, so timing says nothing about which matched.
        for key, tenant in self._keys:
            if hmac.compare_digest(candidate, key):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found


def authenticate(keys: ApiKeys) -> None:
    """Set `g.tenant` for this request (a `before_request` hook of the `/v1` blueprint)."""
    g.tenant = keys.tenant_for(request.headers.get("Authorization"))


def current_tenant() -> str:
    """The tenant `authenticate` found for this request."""
    return g.tenant
