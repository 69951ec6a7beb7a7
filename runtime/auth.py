"""Service-token authentication: only the gateway and the control plane hold the token."""

from __future__ import annotations

import hmac
from collections.abc import Collection

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send


class ServiceTokenAuth:
    """Refuses every HTTP request and WebSocket (the runtime link) but the open paths unless
    it carries `Bearer <token>`; a WebSocket is refused before accept (uvicorn answers 403)."""

    def __init__(
        self, app: ASGIApp, token: str, open_paths: Collection[str] = ("/healthz",)
    ) -> None:
        if not token:
            raise ValueError("a service token is required")
        self.app = app
        self._expected = b"Bearer " + token.encode()
        self._open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._open_paths:
            await self.app(scope, receive, send)
            return
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = value
                break
        if hmac.compare_digest(presented, self._expected):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008,
                        "reason": "a valid service token is required"})
            return
        body = orjson.dumps(
            {"error": {"code": "unauthorized", "message": "a valid service token is required"}}
        )
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
        })
        await send({"type": "http.response.body", "body": body})
