"""Relays one chat to the runtime and its answer to the client, token by token, and emits the
request's usage event whatever happens: completed, failed, or cancelled by a disconnect."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson

from gateway.access import Access
from gateway.errors import GatewayError, RuntimeFailure, RuntimeTimeout, Unavailable
from gateway.metrics import GatewayMetrics
from gateway.responses import Headers, Receive, Send, send_body, send_error
from gateway.sse import SseSplitter, encode_event
from gateway.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.usage import UsageEmitter, UsageRecord

_SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# The status a cancelled request is counted under in the metrics (nginx's "client closed").
CLIENT_CLOSED = 499


@dataclass(slots=True)
class ChatRequest:
    request_id: str
    access: Access
    message: str
    session_id: str
    streamed: bool
    response_headers: Headers


@dataclass(slots=True)
class Outcome:
    status: str = "failed"
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_ms: float | None = None


class ClientGone(Exception):
    """The client disconnected; the run upstream is abandoned."""


class DisconnectWatch:
    """Cancels the request's task when the client goes away while the answer is still coming.

    Started only once an answer turns out not to arrive in one piece, so the common short
    answer costs no extra task; stopped before the last message is sent, since the server then
    reports the finished response as a disconnect too."""

    __slots__ = ("_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.gone = False

    def start(self) -> None:
        if self._watcher is None:
            self._task = asyncio.current_task()
            self._watcher = asyncio.create_task(self._wait())

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def _wait(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                assert self._task is not None
                self._task.cancel()
                return


class Relay:
    def __init__(
        self,
        upstream: UpstreamPool,
        usage: UsageEmitter,
        metrics: GatewayMetrics,
        *,
        runtime_token: str,
    ) -> None:
        self._upstream = upstream
        self._usage = usage
        self._metrics = metrics
        self._auth = f"Bearer {runtime_token}".encode()
        self.open_streams = 0

    async def run(self, chat: ChatRequest, receive: Receive, send: Send) -> int:
        """Answer the chat; return the HTTP status sent."""
        started = time.perf_counter()
        outcome = Outcome()
        watch = DisconnectWatch(receive)
        self.open_streams += 1
        try:
            return await self._relay(chat, send, outcome, started, watch)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            outcome.status = "cancelled"
            return CLIENT_CLOSED
        except ClientGone:
            outcome.status = "cancelled"
            return CLIENT_CLOSED
        finally:
            self.open_streams -= 1
            watch.stop()
            self._emit_usage(chat, outcome, started)

    async def _relay(
        self, chat: ChatRequest, send: Send, outcome: Outcome, started: float,
        watch: DisconnectWatch,
    ) -> int:
        agent = chat.access.agent
        body = orjson.dumps({
            "input_value": chat.message,
            # Sessions live in the runtime per agent instance, so two tenants can never share one.
            "session_id": f"{agent.agent_id}:{chat.session_id}",
            "variables": {
                "tenant_id": agent.tenant_id,
                "agent_id": agent.agent_id,
                "collection": agent.collection,
                "request_id": chat.request_id,
            },
        })
        headers = [
            (b"authorization", self._auth),
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream"),
            (b"x-request-id", chat.request_id.encode()),
        ]
        try:
            response = await self._upstream.request(
                "POST", (agent.runtime_host, agent.runtime_port, agent.stream_path), headers, body
            )
        except UpstreamConnectError:
            return await _fail(chat, send, watch, Unavailable(
                "the agent runtime is unreachable", headers=[(b"retry-after", b"1")]))
        except UpstreamTimeout:
            return await _fail(
                chat, send, watch, RuntimeTimeout("the agent runtime did not answer"))
        except UpstreamError:
            return await _fail(chat, send, watch, RuntimeFailure("the agent runtime failed"))
        try:
            if response.status != 200:
                return await _fail(chat, send, watch, RuntimeFailure(
                    f"the agent runtime answered {response.status}"))
            if chat.streamed:
                return await self._stream(chat, send, response, outcome, started, watch)
            return await self._collect(chat, send, response, outcome, started, watch)
        finally:
            await response.aclose()

    async def _stream(
        self, chat: ChatRequest, send: Send, response: UpstreamResponse, outcome: Outcome,
        started: float, watch: DisconnectWatch,
    ) -> int:
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [*_SSE_HEADERS, *chat.response_headers],
        })
        splitter = SseSplitter()
        done = False
        try:
            async for chunk in response.iter_raw():
                if done:
                    continue  # drain the upstream's last bytes so its connection is reused
                out: list[bytes] = []
                for event in splitter.feed(chunk):
                    name = event.name
                    if name == b"token":
                        if outcome.ttft_ms is None:
                            outcome.ttft_ms = self._first_token(started)
                        out.append(event.raw)
                    elif name == b"end":
                        out.append(encode_event(b"end", self._end(chat, event.data, outcome)))
                        done = True
                        break
                    elif name == b"error":
                        out.append(encode_event(b"error", _error(chat, event.data)))
                        done = True
                        break
                if done:
                    watch.stop()
                    await _send_last(send, b"".join(out))
                else:
                    if out:
                        await _send_more(send, b"".join(out))
                    watch.start()
        except UpstreamError as exc:
            if done:
                return 200
            code, message = (
                ("runtime_timeout", "the agent runtime stopped answering")
                if isinstance(exc, UpstreamTimeout)
                else ("runtime_error", "the agent runtime failed mid-answer")
            )
            watch.stop()
            await _send_last(send, encode_event(b"error", _error_body(chat, code, message)))
            return 200
        if not done:
            watch.stop()
            await _send_last(send, encode_event(b"error", _error_body(
                chat, "runtime_error", "the agent runtime ended without an answer")))
        return 200

    async def _collect(
        self, chat: ChatRequest, send: Send, response: UpstreamResponse, outcome: Outcome,
        started: float, watch: DisconnectWatch,
    ) -> int:
        splitter = SseSplitter()
        answer: bytes | None = None
        failure: GatewayError | None = None
        try:
            async for chunk in response.iter_raw():
                if answer is not None or failure is not None:
                    continue  # drain, as above
                for event in splitter.feed(chunk):
                    if event.name == b"token" and outcome.ttft_ms is None:
                        outcome.ttft_ms = self._first_token(started)
                    elif event.name == b"end":
                        answer = self._end(chat, event.data, outcome)
                        break
                    elif event.name == b"error":
                        failure = _runtime_failure(event.data)
                        break
                else:
                    watch.start()
        except UpstreamTimeout:
            failure = failure or RuntimeTimeout("the agent runtime stopped answering")
        except UpstreamError:
            failure = failure or RuntimeFailure("the agent runtime failed mid-answer")
        if answer is not None:
            watch.stop()
            await send_body(send, 200, answer, chat.response_headers)
            return 200
        return await _fail(chat, send, watch, failure or RuntimeFailure(
            "the agent runtime ended without an answer"))

    def _first_token(self, started: float) -> float:
        elapsed = time.perf_counter() - started
        self._metrics.upstream_ttft.observe(elapsed)
        return elapsed * 1000

    def _end(self, chat: ChatRequest, data: bytes, outcome: Outcome) -> bytes:
        end = orjson.loads(data)
        usage = end.get("usage") or {}
        outcome.input_tokens = int(usage.get("input_tokens", 0))
        outcome.output_tokens = int(usage.get("output_tokens", 0))
        outcome.status = "completed"
        return orjson.dumps({
            "text": end.get("text", ""),
            "session_id": chat.session_id,
            "request_id": chat.request_id,
            "usage": {
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
            },
        })

    def _emit_usage(self, chat: ChatRequest, outcome: Outcome, started: float) -> None:
        key = chat.access.key
        self._usage.emit(UsageRecord(
            request_id=chat.request_id,
            tenant_id=key.tenant_id,
            agent_id=key.agent_id,
            key_id=key.key_id,
            session_id=chat.session_id,
            status=outcome.status,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            duration_ms=(time.perf_counter() - started) * 1000,
            ttft_ms=outcome.ttft_ms,
        ))


async def _fail(chat: ChatRequest, send: Send, watch: DisconnectWatch, exc: GatewayError) -> int:
    watch.stop()
    await send_error(send, exc, chat.request_id, chat.response_headers)
    return exc.status


def _upstream_error(data: bytes) -> tuple[str, str]:
    """The code and message of the runtime's `error` event."""
    try:
        upstream = orjson.loads(data)
        return str(upstream["code"]), str(upstream["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "runtime_error", "the agent runtime failed"


def _runtime_failure(data: bytes) -> GatewayError:
    code, message = _upstream_error(data)
    return RuntimeTimeout(message) if code == "runtime_timeout" else RuntimeFailure(message)


def _error(chat: ChatRequest, data: bytes) -> bytes:
    return _error_body(chat, *_upstream_error(data))


def _error_body(chat: ChatRequest, code: str, message: str) -> bytes:
    return orjson.dumps({"code": code, "message": message, "request_id": chat.request_id})


async def _send_more(send: Send, body: bytes) -> None:
    try:
        await send({"type": "http.response.body", "body": body, "more_body": True})
    except OSError as exc:  # the ASGI server's word for a client that went away
        raise ClientGone() from exc


async def _send_last(send: Send, body: bytes) -> None:
    try:
        await send({"type": "http.response.body", "body": body})
    except OSError as exc:
        raise ClientGone() from exc
