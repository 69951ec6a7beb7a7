"""Relays one chat to the runtime and its answer to the client, token by token, and emits the
request's usage event whatever happens: completed, failed, or cancelled by a disconnect. The event
is emitted (written to the spool) before the client is sent the end of its answer, so an answer a
client received always has its event, even if the gateway is killed at once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import time
from dataclasses import dataclass

import orjson

from gateway.access import Access
from gateway.admission import Refused, Verdict
from gateway.errors import GatewayError, RuntimeFailure, RuntimeTimeout, Unavailable
from gateway.metrics import GatewayMetrics
from gateway.reply import ClientGone, Reply, reply_error
from gateway.responses import Headers
from gateway.sse import SseError, SseEvent, SseSplitter, encode_event
from gateway.upstream import (
    RuntimeAnswer,
    RuntimeCaller,
    UpstreamConnectError,
    UpstreamError,
    UpstreamNoDescriptors,
    UpstreamProtocolError,
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
_DESCRIPTOR_WARNING_S = 10.0

log = logging.getLogger("sitekit.gateway")


@dataclass(slots=True)
class ChatRequest:
    request_id: str
    access: Access
    message: str
    session_id: str
    streamed: bool
    response_headers: Headers
    # The limiter's pending decision when the run starts before it (gateway.admission).
    verdict: Verdict | None = None


@dataclass(slots=True)
class Outcome:
    status: str = "failed"
    input_tokens: int = 0  # known only from the runtime's end
    # The runtime's count once its end came; before that, the tokens it sent (one per `token`
    # event), so that a chat cut short or failed mid-answer reports what was generated.
    output_tokens: int = 0
    ttft_ms: float | None = None
    answering: bool = False  # a streamed answer's head went out
    refused: bool = False  # the limiter refused a chat that had started ahead: not billed
    emitted: bool = False  # the usage event was emitted
    started: float = 0.0  # perf_counter() when the relay took the chat


class MalformedAnswer(UpstreamProtocolError):
    """The runtime's answer is not what its API promises (an unreadable `end`, say)."""


class Relay:
    def __init__(
        self,
        upstream: RuntimeCaller,
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
        self._descriptor_warned = -_DESCRIPTOR_WARNING_S

    async def run(self, chat: ChatRequest, reply: Reply) -> int:
        """Answer the chat; return the HTTP status sent."""
        outcome = Outcome(started=time.perf_counter())
        self.open_streams += 1
        try:
            return await self._relay(chat, reply, outcome)
        except Refused as refused:
            return await self._refuse(chat, reply, outcome, refused)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            verdict = chat.verdict
            if verdict is not None:
                verdict.close()  # a refusal from now on must not cancel what follows
                if verdict.cut_off and not reply.gone:
                    task.uncancel()  # refused while the run was starting: the run is cancelled
                    try:
                        await verdict.admit()
                    except Refused as refused:
                        return await self._refuse(chat, reply, outcome, refused)
            if not reply.gone:  # the worker is stopping, past its drain bound
                await self._cut_short(chat, reply, outcome)
                raise
            task.uncancel()
            outcome.status = "cancelled"
            return CLIENT_CLOSED
        except ClientGone:
            outcome.status = "cancelled"
            return CLIENT_CLOSED
        finally:
            self.open_streams -= 1
            if chat.verdict is not None:
                chat.verdict.close()
            self._settle(chat, reply, outcome)  # if no answer went out (cancelled, say)

    async def _relay(self, chat: ChatRequest, reply: Reply, outcome: Outcome) -> int:
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
        reply.watch()  # from here a client that goes away cancels the run, even before its head
        try:
            response = await self._upstream.request(
                "POST", (agent.runtime_host, agent.runtime_port, agent.stream_path), headers, body
            )
        except UpstreamError as exc:
            await self._admitted(chat)  # a refusal is the answer, whatever the runtime did
            return await self._fail(chat, reply, outcome, self._unanswered(exc))
        try:
            await self._admitted(chat)  # nothing reaches the client before the chat is admitted
            if response.status != 200:
                return await self._fail(chat, reply, outcome, RuntimeFailure(
                    f"the agent runtime answered {response.status}"))
            if chat.streamed:
                return await self._stream(chat, reply, response, outcome)
            return await self._collect(chat, reply, response, outcome)
        finally:
            await response.aclose()

    async def _stream(
        self, chat: ChatRequest, reply: Reply, response: RuntimeAnswer, outcome: Outcome
    ) -> int:
        await reply.start(200, [*_SSE_HEADERS, *chat.response_headers])
        outcome.answering = True
        splitter = SseSplitter()
        done = False
        try:
            async for chunk in response.iter_raw():
                if done:
                    continue  # drain the upstream's last bytes so its connection is reused
                out: list[bytes] = []
                for event in _events(splitter, chunk):
                    name = event.name
                    if name == b"token":
                        self._token(outcome)
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
                    self._settle(chat, reply, outcome)
                    await reply.last(b"".join(out))
                elif out:
                    await reply.more(b"".join(out))
        except UpstreamError as exc:
            if done:
                return 200
            failure = _mid_answer(exc)
            self._settle(chat, reply, outcome)
            await reply.last(encode_event(b"error", _error_body(
                chat, failure.code, failure.message)))
            return 200
        if not done:
            self._settle(chat, reply, outcome)
            await reply.last(encode_event(b"error", _error_body(
                chat, "runtime_error", "the agent runtime ended without an answer")))
        return 200

    async def _collect(
        self, chat: ChatRequest, reply: Reply, response: RuntimeAnswer, outcome: Outcome
    ) -> int:
        splitter = SseSplitter()
        answer: bytes | None = None
        failure: GatewayError | None = None
        try:
            async for chunk in response.iter_raw():
                if answer is not None or failure is not None:
                    continue  # drain, as above
                for event in _events(splitter, chunk):
                    if event.name == b"token":
                        self._token(outcome)
                    elif event.name == b"end":
                        answer = self._end(chat, event.data, outcome)
                        break
                    elif event.name == b"error":
                        failure = _runtime_failure(event.data)
                        break
        except UpstreamError as exc:
            if answer is None and failure is None:
                failure = _mid_answer(exc)
        if answer is not None:
            self._settle(chat, reply, outcome)
            await reply.whole(200, answer, chat.response_headers)
            return 200
        return await self._fail(chat, reply, outcome, failure or RuntimeFailure(
            "the agent runtime ended without an answer"))

    async def _admitted(self, chat: ChatRequest) -> None:
        """Wait for the limiter's decision on a chat that started ahead of it, and add its
        RateLimit headers to the response; Refused if it was not admitted."""
        verdict = chat.verdict
        if verdict is not None:
            chat.response_headers += await verdict.admit()

    async def _refuse(
        self, chat: ChatRequest, reply: Reply, outcome: Outcome, refused: Refused
    ) -> int:
        """Answer the limiter's refusal of a chat whose run had started (and is cancelled by
        now): the client gets what it would have got before the run, and no usage event."""
        outcome.refused = True
        self._settle(chat, reply, outcome)
        await reply_error(reply, refused.error, chat.request_id,
                          [*chat.response_headers, *refused.headers])
        return refused.error.status

    def _unanswered(self, exc: UpstreamError) -> GatewayError:
        """What a client is told of a run the runtime did not answer."""
        if isinstance(exc, UpstreamNoDescriptors):
            self._out_of_descriptors(exc)
            return Unavailable("the gateway has no free connections; retry shortly")
        if isinstance(exc, UpstreamConnectError):
            return Unavailable("the agent runtime is unreachable")
        if isinstance(exc, UpstreamTimeout):
            return RuntimeTimeout("the agent runtime did not answer")
        return RuntimeFailure("the agent runtime failed")

    def _out_of_descriptors(self, exc: UpstreamNoDescriptors) -> None:
        """Tell the operator, at most every `_DESCRIPTOR_WARNING_S`: each open chat holds a
        descriptor (two over HTTP/1.1 to the runtime), so the open-files limit caps its streams."""
        now = time.monotonic()
        if now - self._descriptor_warned < _DESCRIPTOR_WARNING_S:
            return
        self._descriptor_warned = now
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error(
            "refusing chats: no file descriptor left for a runtime connection (%s) with %d "
            "chats open and RLIMIT_NOFILE %d; each open chat takes one (two over "
            "GATEWAY_RUNTIME_TRANSPORT=http), so raise the hard limit (ulimit -Hn, systemd "
            "LimitNOFILE) or add workers", exc.__cause__,
            self.open_streams, soft,
        )

    def _token(self, outcome: Outcome) -> None:
        outcome.output_tokens += 1  # the end's count replaces this
        if outcome.ttft_ms is None:
            elapsed = time.perf_counter() - outcome.started
            self._metrics.upstream_ttft.observe(elapsed)
            outcome.ttft_ms = elapsed * 1000

    def _end(self, chat: ChatRequest, data: bytes, outcome: Outcome) -> bytes:
        try:
            end = orjson.loads(data)
            usage = end.get("usage") or {}
            input_tokens = int(usage.get("input_tokens", 0))
            output_tokens = int(usage.get("output_tokens", 0))
            text = end.get("text", "")
            if not isinstance(text, str):
                raise TypeError(f"its text is a {type(text).__name__}")
        except (ValueError, TypeError, AttributeError) as exc:
            raise MalformedAnswer(f"the runtime's end event is unreadable: {exc}") from exc
        outcome.input_tokens, outcome.output_tokens = input_tokens, output_tokens
        outcome.status = "completed"
        return orjson.dumps({
            "text": text,
            "session_id": chat.session_id,
            "request_id": chat.request_id,
            "usage": {
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
            },
        })

    async def _fail(
        self, chat: ChatRequest, reply: Reply, outcome: Outcome, exc: GatewayError
    ) -> int:
        self._settle(chat, reply, outcome)
        await reply_error(reply, exc, chat.request_id, chat.response_headers)
        return exc.status

    async def _cut_short(self, chat: ChatRequest, reply: Reply, outcome: Outcome) -> None:
        """Tell the client why its answer ends here rather than just closing the connection."""
        with contextlib.suppress(Exception):  # the connection may be gone too
            if outcome.answering:
                self._settle(chat, reply, outcome)
                await reply.last(encode_event(b"error", _error_body(
                    chat, "unavailable",
                    "the gateway is shutting down; the answer was cut short")))
            else:
                await self._fail(chat, reply, outcome, Unavailable(
                    "the gateway is shutting down; retry"))

    def _settle(self, chat: ChatRequest, reply: Reply, outcome: Outcome) -> None:
        """Called before the client is sent the end of its answer (or an error): stop watching
        for a disconnect, and emit the chat's usage event, once."""
        reply.unwatch()
        if outcome.emitted:
            return
        outcome.emitted = True
        if outcome.refused:
            return
        key = chat.access.key
        record = UsageRecord(
            request_id=chat.request_id,
            tenant_id=key.tenant_id,
            agent_id=key.agent_id,
            key_id=key.key_id,
            session_id=chat.session_id,
            status=outcome.status,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            duration_ms=(time.perf_counter() - outcome.started) * 1000,
            ttft_ms=outcome.ttft_ms,
        )
        if chat.verdict is None:
            self._emit(record)
        else:  # at once if admitted; if it is still undecided (the client left), once it is
            chat.verdict.when_admitted(functools.partial(self._emit, record))

    def _emit(self, record: UsageRecord) -> None:
        self._usage.emit(record)
        self._metrics.child(self._metrics.usage_events, record.status).inc()


def _events(splitter: SseSplitter, chunk: bytes) -> list[SseEvent]:
    try:
        return splitter.feed(chunk)
    except SseError as exc:
        raise MalformedAnswer(f"the runtime's answer breaks the SSE limits: {exc}") from exc


def _mid_answer(exc: UpstreamError) -> GatewayError:
    """What a client is told of a runtime that failed after its head."""
    if isinstance(exc, UpstreamTimeout):
        return RuntimeTimeout("the agent runtime stopped answering")
    if isinstance(exc, MalformedAnswer):
        return RuntimeFailure("the agent runtime sent an unreadable answer")
    return RuntimeFailure("the agent runtime failed mid-answer")


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
