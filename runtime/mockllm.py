"""An OpenAI-compatible mock LLM for dev, tests and load runs, as a raw ASGI app.

Endpoints: `POST /v1/chat/completions` (streamed or not), `POST /v1/embeddings`,
`GET /v1/models`, `GET /healthz`, and `GET /_stats` (stream counters for tests).
Answers come from `runtime.mock_answers`; the pace is set by environment:

    MOCKLLM_HOST (127.0.0.1)  MOCKLLM_PORT (8091)  MOCKLLM_FIRST_TOKEN_MS (200)
    MOCKLLM_TOKENS_PER_S (40)  MOCKLLM_ANSWER_TOKENS (40)  MOCKLLM_SLOW_TOKEN_MS (1000)
    MOCKLLM_EMBEDDING_DIM (256)  MOCKLLM_MODEL (mock-gpt)

Hooks inside the last user message: `#tokens=N` answers with N tokens, `#fail` aborts the
connection mid-stream (after `FAIL_AFTER_TOKENS` tokens), `#slow` paces tokens at
MOCKLLM_SLOW_TOKEN_MS, `#echo` answers with the whole message, word by word (how tests see the
prompt a flow built). Run with `python -m runtime.mockllm`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from runtime.asgi import wait_for_disconnect
from runtime.mock_answers import AnswerPlan, count_words, embed, plan_answer
from runtime.openai_wire import (
    BadRequest,
    ChunkWriter,
    last_user_text,
    prompt_tokens,
    read_json,
)

FAIL_AFTER_TOKENS = 3
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_EMBEDDING_DIM = 4096
EMBEDDING_MODEL = "text-embedding-mock"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON_HEADERS = [(b"content-type", b"application/json")]


class SettingsError(ValueError):
    """An environment value the mock cannot start with."""


@dataclass(frozen=True, slots=True)
class MockSettings:
    host: str = "127.0.0.1"
    port: int = 8091
    first_token_ms: float = 200.0
    tokens_per_s: float = 40.0
    answer_tokens: int = 40
    slow_token_ms: float = 1000.0
    embedding_dim: int = 256
    model: str = "mock-gpt"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MockSettings:
        def number(name: str, default: float, minimum: float) -> float:
            raw = env.get(name)
            try:
                value = float(raw) if raw else default
            except ValueError as exc:
                raise SettingsError(f"{name} must be a number, got {raw!r}") from exc
            if value < minimum:
                raise SettingsError(f"{name} must be at least {minimum}, got {raw!r}")
            return value

        default = cls()
        settings = cls(
            host=env.get("MOCKLLM_HOST") or default.host,
            port=int(number("MOCKLLM_PORT", default.port, 1)),
            first_token_ms=number("MOCKLLM_FIRST_TOKEN_MS", default.first_token_ms, 0),
            tokens_per_s=number("MOCKLLM_TOKENS_PER_S", default.tokens_per_s, 0.001),
            answer_tokens=int(number("MOCKLLM_ANSWER_TOKENS", default.answer_tokens, 1)),
            slow_token_ms=number("MOCKLLM_SLOW_TOKEN_MS", default.slow_token_ms, 0),
            embedding_dim=int(number("MOCKLLM_EMBEDDING_DIM", default.embedding_dim, 1)),
            model=env.get("MOCKLLM_MODEL") or default.model,
        )
        if settings.port > 65535 or settings.embedding_dim > MAX_EMBEDDING_DIM:
            raise SettingsError("MOCKLLM_PORT or MOCKLLM_EMBEDDING_DIM out of range")
        return settings


@dataclass(slots=True)
class MockStats:
    """Counters that let tests see what the mock saw, e.g. a stream closed by its client."""

    chat_requests: int = 0
    embedding_requests: int = 0
    streams_open: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    streams_failed: int = 0
    last_user_messages: list[str] = field(default_factory=list)

    def remember(self, message: str) -> None:
        self.last_user_messages.append(message)
        del self.last_user_messages[:-20]


class StreamAborted(Exception):
    """Raised inside the app on purpose: uvicorn then drops the connection mid-body."""


class MockLLM:
    """The ASGI app; holds its own counters so several instances never share state."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.stats = MockStats()
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        try:
            if route == ("POST", "/v1/chat/completions"):
                await self._chat(await read_json(receive, MAX_BODY_BYTES), receive, send)
            elif route == ("POST", "/v1/embeddings"):
                body = await read_json(receive, MAX_BODY_BYTES)
                await _send_json(send, 200, self._embeddings(body))
            elif route == ("GET", "/v1/models"):
                await _send_json(send, 200, self._models())
            elif route == ("GET", "/healthz"):
                await _send_json(send, 200, {"status": "ok"})
            elif route == ("GET", "/_stats"):
                await _send_json(send, 200, asdict(self.stats))
            else:
                raise BadRequest(404, f"no route {scope['method']} {scope['path']}")
        except BadRequest as exc:
            error = {"message": str(exc), "type": "invalid_request_error", "param": None,
                     "code": None}
            await _send_json(send, exc.status, {"error": error})

    def _models(self) -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "sitekit"}
            for name in (self.settings.model, EMBEDDING_MODEL)
        ]
        return {"object": "list", "data": data}

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        self.stats.embedding_requests += 1
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            raise BadRequest(400, "input must be a string or a non-empty list")
        dimensions = body.get("dimensions") or self.settings.embedding_dim
        if not isinstance(dimensions, int) or not 0 < dimensions <= MAX_EMBEDDING_DIM:
            raise BadRequest(400, f"dimensions must be an integer in 1..{MAX_EMBEDDING_DIM}")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        words = 0
        for index, item in enumerate(texts):
            # Token-id inputs are embedded as their decimal spelling: still deterministic.
            text = item if isinstance(item, str) else " ".join(map(str, item))
            words += count_words(text)
            vector = embed(text, dimensions)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        model = body.get("model") or EMBEDDING_MODEL
        usage = {"prompt_tokens": words, "total_tokens": words}
        return {"object": "list", "data": data, "model": model, "usage": usage}

    async def _chat(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        self.stats.chat_requests += 1
        messages = body.get("messages")
        last = last_user_text(messages)
        self.stats.remember(last)
        plan = plan_answer(last, self.settings.answer_tokens)
        tokens = plan.tokens()
        finish = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        prompt_words = prompt_tokens(messages)
        usage = {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_words + len(tokens),
        }
        completion_id = f"chatcmpl-mock{next(self._ids):08d}"
        model = str(body.get("model") or self.settings.model)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            stream = ChunkWriter(completion_id, model, include_usage)
            await self._stream(plan, tokens, finish, usage, stream, receive, send)
            return
        if plan.fail:
            raise BadRequest(500, "the mock failed this request on purpose (#fail)")
        await asyncio.sleep(self._delay(plan, len(tokens)))
        message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        await _send_json(send, 200, {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage,
            "system_fingerprint": "fp_mock",
        })

    def _interval(self, plan: AnswerPlan) -> float:
        if plan.slow:
            return self.settings.slow_token_ms / 1000
        return 1 / self.settings.tokens_per_s

    def _delay(self, plan: AnswerPlan, n_tokens: int) -> float:
        return self.settings.first_token_ms / 1000 + max(n_tokens - 1, 0) * self._interval(plan)

    async def _stream(
        self, plan: AnswerPlan, tokens: list[str], finish: str, usage: dict[str, int],
        stream: ChunkWriter, receive: Receive, send: Send,
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        # uvicorn's send() is a silent no-op once the client is gone, so watch receive().
        gone = asyncio.create_task(wait_for_disconnect(receive))
        loop = asyncio.get_running_loop()
        start = loop.time() + self.settings.first_token_ms / 1000
        interval = self._interval(plan)
        self.stats.streams_open += 1
        try:
            for i, token in enumerate(tokens):
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if gone.done():
                    self.stats.streams_cancelled += 1
                    return
                if plan.fail and i == FAIL_AFTER_TOKENS:
                    self.stats.streams_failed += 1
                    raise StreamAborted("#fail")
                chunk = stream.content(token, first=i == 0)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            tail = stream.finish(finish) + stream.usage(usage) + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            self.stats.streams_completed += 1
        finally:
            self.stats.streams_open -= 1
            gone.cancel()


async def _send_json(send: Send, status: int, payload: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": orjson.dumps(payload)})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main() -> None:
    import uvicorn

    try:
        settings = MockSettings.from_env(os.environ)
    except SettingsError as exc:
        sys.exit(f"mockllm: {exc}")
    uvicorn.run(
        MockLLM(settings), host=settings.host, port=settings.port, loop="uvloop",
        http="httptools", log_level="warning", access_log=False, timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
