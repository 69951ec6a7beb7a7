"""`GET /v1/agents/{agent_id}/config`: the widget's public settings, and CORS preflights."""

from __future__ import annotations

import orjson

from gateway.access import Gatekeeper, RequestHeaders, cors_headers
from gateway.audit import AuditLog
from gateway.errors import Forbidden, GatewayError
from gateway.metrics import GatewayMetrics
from gateway.registry import RegistryCache
from gateway.responses import Receive, Scope, Send, send_body, send_error

_PUBLIC_SETTINGS = ("name", "greeting", "theme", "starter_prompts", "locale")


class AgentConfigEndpoint:
    def __init__(self, gatekeeper: Gatekeeper) -> None:
        self._gatekeeper = gatekeeper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        headers = RequestHeaders.scan(scope["headers"])
        agent_id: str = scope["path_params"]["agent_id"]
        try:
            access = await self._gatekeeper.admit(
                headers, agent_id, request_id, publishable_only=True
            )
        except GatewayError as exc:
            cors = await self._gatekeeper.refusal_cors(agent_id, headers.origin)
            await send_error(send, exc, request_id, cors)
            return
        widget = access.agent.widget
        body = orjson.dumps({
            "agent_id": access.agent.agent_id,
            **{name: widget[name] for name in _PUBLIC_SETTINGS if name in widget},
        })
        await send_body(send, 200, body, cors_headers(access.origin))


class Preflight:
    """Answers a browser's CORS preflight for an agent from that agent's allowed origins."""

    def __init__(self, registry: RegistryCache, audit: AuditLog, metrics: GatewayMetrics) -> None:
        self._registry = registry
        self._audit = audit
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        agent_id = scope["path_params"]["agent_id"]
        origin = RequestHeaders.scan(scope["headers"]).origin
        try:
            agent = await self._registry.resolve(agent_id)
            text = origin.decode("latin-1") if origin is not None else None
            if text is None or agent is None or text not in agent.allowed_origins:
                self._metrics.child(self._metrics.security, "foreign_origin").inc()
                self._audit.security_event(
                    "foreign_origin", request_id, agent_id=agent_id, origin=text,
                    reason="preflight from an origin this agent does not allow",
                )
                raise Forbidden("this origin may not call this agent")
        except GatewayError as exc:
            await send_error(send, exc, request_id, [])
            return
        await send({
            "type": "http.response.start",
            "status": 204,
            "headers": [
                *cors_headers(text),
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"Authorization, Content-Type, Accept"),
                (b"access-control-max-age", b"600"),
            ],
        })
        await send({"type": "http.response.body", "body": b""})
