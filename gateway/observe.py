"""Gives every request an id (answered as X-Request-Id) and counts it in the metrics."""

from __future__ import annotations

import time
from typing import Any

from gateway.chat import ChatEndpoint
from gateway.ids import uuid7
from gateway.metrics import GatewayMetrics
from gateway.responses import ASGIApp, Message, Receive, Scope, Send


def route_of(path: str) -> str:
    # A fixed set of labels: agent ids in paths must not become metric series.
    if path.startswith("/v1/agents/"):
        if path.endswith("/chat"):
            return "chat"
        if path.endswith("/config"):
            return "config"
        return "other"
    if path in ("/healthz", "/readyz", "/metrics", "/widget.js", "/widget.json"):
        return path[1:]
    if path.startswith("/widget/"):
        return "widget.js"
    return "other"


def chat_agent_id(path: str) -> str | None:
    """The agent id of a chat's path, /v1/agents/{agent_id}/chat; None for any other path."""
    if path.startswith("/v1/agents/") and path.endswith("/chat"):
        agent_id = path[11:-5]
        if agent_id and "/" not in agent_id:
            return agent_id
    return None


class Deferred:
    """An ASGI endpoint whose real handler is made in the lifespan, once the pools exist."""

    def __init__(self) -> None:
        self.handler: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        return await self.handler(scope, receive, send)


class Front:
    """The outermost ASGI app. Chats, the hot path, go straight to their handler (which sends
    X-Request-Id itself and returns its status); every other request goes through the router
    with the header added here. The gateway's own HTTP protocol (`gateway.http`) takes chats
    before ASGI, from `chat_endpoint`."""

    def __init__(self, app: ASGIApp, chat: Deferred, metrics: GatewayMetrics) -> None:
        self._app = app
        self._chat = chat
        self.metrics = metrics

    @property
    def chat_endpoint(self) -> ChatEndpoint | None:
        """The chat handler, once the lifespan has made it."""
        handler = self._chat.handler
        return handler if isinstance(handler, ChatEndpoint) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = uuid7()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        path: str = scope["path"]
        if scope["method"] == "POST":
            agent_id = chat_agent_id(path)
            if agent_id is not None:
                scope["path_params"] = {"agent_id": agent_id}
                status = 500
                try:
                    status = await self._chat(scope, receive, send)
                finally:
                    self.metrics.record_request("chat", status, time.perf_counter() - started)
                return
        header = (b"x-request-id", request_id.encode())
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        finally:
            self.metrics.record_request(route_of(path), status, time.perf_counter() - started)
