"""OpenAI's chat completion wire format, as much of it as the mock LLM speaks.

Request side: the text of the last user message and a word count of all messages.
Response side: `chat.completion.chunk` SSE lines, pre-encoded around the part that varies
(OpenAI's exact field set, `"usage": null` on every chunk when usage is requested, then one
usage chunk with no choices). Errors are OpenAI's `{"error": {...}}` shape.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import Receive

from runtime.mock_answers import count_words


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def last_user_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        )
    return ""


def prompt_tokens(messages: Any) -> int:
    texts = (content_text(m.get("content")) for m in messages if isinstance(m, dict))
    return sum(count_words(text) for text in texts)


class ChunkWriter:
    """Chat completion chunks in OpenAI's wire format, pre-encoded around the varying part."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        head = {"id": completion_id, "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_mock"}
        self._head = b"data: " + orjson.dumps(head)[:-1] + b',"choices":['
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self._include_usage = include_usage

    def _choice(self, delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head + orjson.dumps(choice) + self._tail

    def content(self, token: str, *, first: bool) -> bytes:
        delta: dict[str, Any] = {"content": token}
        if first:
            delta = {"role": "assistant", "content": token, "refusal": None}
        return self._choice(delta, None)

    def finish(self, reason: str) -> bytes:
        return self._choice({}, reason)

    def usage(self, usage: dict[str, int]) -> bytes:
        if not self._include_usage:
            return b""
        return self._head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"


async def read_json(receive: Receive, limit: int) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "request body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, f"invalid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return body
