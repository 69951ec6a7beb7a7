"""`POST /v1/agents/{agent_id}/chat`: admit, validate, limit (or start the run while the limit is
decided: gateway.admission), then relay the runtime's answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from dataclasses import dataclass

import orjson

from gateway.access import Access, Gatekeeper, RequestHeaders, cors_headers
from gateway.admission import Forecast, Judgement, Verdict
from gateway.busy_poll import BusyPoll
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    UnsupportedMediaType,
)
from gateway.keys import KeyClaims
from gateway.log_throttle import REDIS_CLUSTER_HINT, LogThrottle
from gateway.metrics import GatewayMetrics
from gateway.relay import ChatRequest, Relay
from gateway.reply import AsgiReply, Reply, reply_error
from gateway.responses import Headers, Receive, Scope, Send, rate_limit_headers
from ratelimit import Limiter
from ratelimit.buckets import Decision
from ratelimit.errors import LimiterRedirected, RateLimitError

log = logging.getLogger("sitekit.gateway")

_MAX_SESSION_ID = 128
# Runs start ahead of their decision only while this worker has at most this many checks
# waiting on Redis (this one included). Past that it is busy: the round trip is shared by a
# batch, and runs started as their decisions come in reach the runtime together, which measured
# 13% more requests per second than starting each ahead (5,947 against 6,808 at 256 connections).
RUN_AHEAD_MAX_UNDECIDED = 4


@dataclass(frozen=True, slots=True)
class ChatMessage:
    message: str
    session_id: str


class ChatEndpoint:
    def __init__(
        self,
        gatekeeper: Gatekeeper,
        limiter: Limiter,
        relay: Relay,
        metrics: GatewayMetrics,
        *,
        max_body_bytes: int,
        max_message_chars: int,
        run_ahead: bool = True,
        busy_poll: BusyPoll | None = None,
    ) -> None:
        self._gatekeeper = gatekeeper
        self._limiter = limiter
        self._limiter_failing = LogThrottle()
        self._relay = relay
        self._metrics = metrics
        self._busy_poll = busy_poll
        self._max_body = max_body_bytes
        self._max_chars = max_message_chars
        # Runs start before the limiter's decision when the key's last one left tokens
        # (gateway.admission); None: every chat waits for its decision first.
        self._forecast = Forecast() if run_ahead else None
        # Chats started ahead, by their decision; copied into the metrics once a second.
        self.started_ahead = {"admitted": 0, "refused": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one chat under an ASGI server; return the HTTP status sent."""
        return await self.handle(
            scope["headers"], scope["path_params"]["agent_id"], scope["state"]["request_id"],
            AsgiReply(receive, send),
        )

    async def handle(
        self, raw_headers: list[tuple[bytes, bytes]], agent_id: str, request_id: str,
        reply: Reply,
    ) -> int:
        """Answer one chat; return the HTTP status sent."""
        busy_poll = self._busy_poll
        if busy_poll is not None:
            busy_poll.kick()
        headers = RequestHeaders.scan(raw_headers)
        extra: Headers = [(b"x-request-id", request_id.encode())]
        access: Access | None = None
        verdict: Verdict | None = None
        try:
            access = await self._gatekeeper.admit(headers, agent_id, request_id)
            extra += cors_headers(access.origin)
            body = await self._read_body(headers, reply)
            chat = self._parse(body)
            key, agent = access.key, access.agent
            pending = self._limiter.submit(
                key.tenant_id, key.key_id, agent.tenant_limit, agent.key_limit)
            forecast = self._forecast
            if (
                forecast is not None
                and self._limiter.undecided <= RUN_AHEAD_MAX_UNDECIDED
                and forecast.reserve(key.tenant_id, key.key_id)
            ):
                verdict = Verdict(pending, functools.partial(self._judge, key, True))
            else:
                with contextlib.suppress(RateLimitError):  # judged below
                    await pending
                limits, refusal = self._judge(key, False, pending)
                extra += limits
                if refusal is not None:
                    raise refusal
        except GatewayError as exc:
            if access is None:
                extra += await self._gatekeeper.refusal_cors(agent_id, headers.origin)
            await reply_error(reply, exc, request_id, extra)
            return exc.status
        streamed = headers.accept is not None and b"text/event-stream" in headers.accept
        return await self._relay.run(
            ChatRequest(
                request_id=request_id,
                access=access,
                message=chat.message,
                session_id=chat.session_id,
                streamed=streamed,
                response_headers=extra,
                verdict=verdict,
            ),
            reply,
        )

    def _judge(
        self, key: KeyClaims, reserved: bool, pending: asyncio.Future[Decision]
    ) -> Judgement:
        """What the limiter's answer means for the chat: its RateLimit headers, and the error
        to answer instead if it was not admitted. Called once per chat, as soon as the answer
        has come; `reserved` if the chat started ahead on the forecast."""
        try:
            decision: Decision | None = pending.result()
        except RateLimitError as exc:
            decision = None
            if self._limiter_failing.due():
                hint = f" ({REDIS_CLUSTER_HINT})" if isinstance(exc, LimiterRedirected) else ""
                log.warning("the rate limiter cannot decide; chats get 503: %s%s", exc, hint)
        admitted = decision is not None and decision.allowed
        if self._forecast is not None:
            self._forecast.learn(key.tenant_id, key.key_id,
                                 decision.remaining if decision is not None and admitted else 0,
                                 reserved=reserved)
        metrics = self._metrics
        metrics.child(metrics.limiter, "error" if decision is None
                      else decision.refused_by or "allowed").inc()
        if reserved:
            self.started_ahead["admitted" if admitted else "refused"] += 1
        if decision is None:
            return [], Unavailable("the rate limiter is unavailable")
        limits = rate_limit_headers(decision.limit, decision.remaining, decision.reset_seconds)
        if admitted:
            return limits, None
        return limits, RateLimited(
            f"too many requests for this {decision.refused_by}; retry in "
            f"{decision.retry_after_seconds} s",
            headers=[(b"retry-after", str(decision.retry_after_seconds).encode())],
        )

    async def _read_body(self, headers: RequestHeaders, reply: Reply) -> bytes:
        content_type = (headers.content_type or b"").split(b";", 1)[0].strip().lower()
        if content_type != b"application/json":
            raise UnsupportedMediaType("the body must be JSON (Content-Type: application/json)")
        if headers.content_length is not None:
            try:
                declared = int(headers.content_length)
            except ValueError:
                raise InvalidRequest("Content-Length is not a number") from None
            if declared > self._max_body:
                raise PayloadTooLarge(f"the body is larger than {self._max_body} bytes")
        return await reply.body(self._max_body)

    def _parse(self, body: bytes) -> ChatMessage:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidRequest("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the body must be a JSON object")
        message = data.get("message")
        if not isinstance(message, str) or not message.strip():
            raise InvalidRequest("'message' must be a non-empty string")
        if len(message) > self._max_chars:
            raise InvalidRequest(f"'message' is longer than {self._max_chars} characters")
        session_id = data.get("session_id")
        if session_id is None:
            session_id = uuid.uuid4().hex
        elif (
            not isinstance(session_id, str)
            or not 0 < len(session_id) <= _MAX_SESSION_ID
            or not session_id.isprintable()
        ):
            raise InvalidRequest(
                f"'session_id' must be a printable string of 1 to {_MAX_SESSION_ID} characters"
            )
        # Anything else the client sends (tenant, flow, collection) is ignored on purpose.
        return ChatMessage(message, session_id)
