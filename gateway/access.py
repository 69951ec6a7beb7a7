"""Who may call which agent: the key, its revocation, the agent's registry entry, the tenant and
the browser origin, checked in that order. Every refusal is a security event in the audit log."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.audit import AuditLog
from gateway.changes import RevokedKeys
from gateway.errors import Forbidden, GatewayError, InvalidKey
from gateway.keys import KeyClaims, KeyVerifier
from gateway.metrics import GatewayMetrics
from gateway.registry import RegistryCache, RegistryEntry


@dataclass(frozen=True, slots=True)
class Access:
    key: KeyClaims
    agent: RegistryEntry
    origin: str | None


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    """The few request headers the gateway reads, found in one pass."""

    authorization: bytes | None = None
    origin: bytes | None = None
    content_type: bytes | None = None
    accept: bytes | None = None
    content_length: bytes | None = None

    @classmethod
    def scan(cls, headers: list[tuple[bytes, bytes]]) -> RequestHeaders:
        found: dict[str, bytes] = {}
        for name, value in headers:
            if name in _WANTED:
                found[_WANTED[name]] = value
        return cls(**found)


_WANTED = {
    b"authorization": "authorization",
    b"origin": "origin",
    b"content-type": "content_type",
    b"accept": "accept",
    b"content-length": "content_length",
}


class Gatekeeper:
    def __init__(
        self,
        verifier: KeyVerifier,
        revoked: RevokedKeys,
        registry: RegistryCache,
        audit: AuditLog,
        metrics: GatewayMetrics,
    ) -> None:
        self._verifier = verifier
        self._revoked = revoked
        self._registry = registry
        self._audit = audit
        self._metrics = metrics

    async def admit(
        self, headers: RequestHeaders, agent_id: str, request_id: str, *,
        publishable_only: bool = False,
    ) -> Access:
        try:
            return await self._admit(headers, agent_id, publishable_only)
        except (InvalidKey, Forbidden) as exc:
            kind = exc.kind if isinstance(exc, Refused) else "invalid_key"
            self._metrics.child(self._metrics.security, kind).inc()
            self._audit.security_event(
                kind, request_id, agent_id=agent_id, reason=exc.message,
                origin=headers.origin.decode("latin-1") if headers.origin else None,
                **getattr(exc, "detail", {}),
            )
            raise

    async def _admit(
        self, headers: RequestHeaders, agent_id: str, publishable_only: bool
    ) -> Access:
        token = _bearer(headers.authorization)
        key = await self._verifier.verify(token)
        if key.key_id in self._revoked:
            raise InvalidKey("the API key has been revoked")
        detail = {"key_id": key.key_id, "key_tenant_id": key.tenant_id}
        agent = await self._registry.resolve(agent_id)
        if agent is None:
            raise Refused("unknown_agent", "no such agent", detail)
        if agent.tenant_id != key.tenant_id:
            raise Refused("cross_tenant", "the API key belongs to another tenant", detail)
        if key.agent_id != agent_id:
            raise Refused("wrong_agent", "the API key belongs to another agent", detail)
        if not agent.active:
            raise Refused("suspended_agent", "this agent is suspended", detail)
        origin = headers.origin.decode("latin-1") if headers.origin is not None else None
        if key.kind == "publishable":
            if origin is None:
                raise Refused("foreign_origin", "a publishable key needs an Origin", detail)
            if origin not in key.origins or origin not in agent.allowed_origins:
                raise Refused(
                    "foreign_origin", f"the origin {origin} is not allowed for this agent", detail
                )
        elif publishable_only:
            raise Refused("wrong_key_type", "this endpoint takes a publishable key", detail)
        return Access(key, agent, origin)

    async def refusal_cors(
        self, agent_id: str, origin: bytes | None
    ) -> list[tuple[bytes, bytes]]:
        """CORS headers for a refusal seen from one of the agent's own origins, so the widget
        there can read why (a revoked key, a suspended agent) rather than see a network error.
        Other origins get none: the browser hides the answer from them, as before."""
        if origin is None:
            return []
        text = origin.decode("latin-1")
        try:
            agent = await self._registry.resolve(agent_id)
        except GatewayError:
            return []
        if agent is None or text not in agent.allowed_origins:
            return []
        return cors_headers(text)


class Refused(Forbidden):
    def __init__(self, kind: str, message: str, detail: dict[str, str]) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail


def _bearer(value: bytes | None) -> str:
    if value is None:
        raise InvalidKey("an API key is required: Authorization: Bearer <key>")
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise InvalidKey("the Authorization header must be 'Bearer <key>'")
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        raise InvalidKey("the API key is malformed") from None


def cors_headers(origin: str | None) -> list[tuple[bytes, bytes]]:
    if origin is None:
        return []
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", _EXPOSED),
        (b"vary", b"Origin"),
    ]


_EXPOSED = b"X-Request-Id, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After"
