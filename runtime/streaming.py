"""The answer of one run as server-sent events: `token`* then `end`, or `error`.

The run is its own task; this response relays its tokens as they arrive (whatever has
queued up since the last write goes out as one write, nothing waits for more). It ends
the run when the client goes away (uvicorn's `send` is silent then, so the response
watches `receive`), when the run's deadline passes (`runtime_timeout`), or when the
run fails (`runtime_error`). Ending a run cancels its task, which closes its LLM request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from runtime.asgi import wait_for_disconnect
from runtime.engine import DeployedFlow, FlowEngine, RunRequest, RunResult
from runtime.errors import RunError, RunTimeout

log = logging.getLogger("runtime.streaming")

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# Token texts are never empty (TokenEvents drops empty chunks), so "" can mark "look up".
_WAKE = ""
_CANCEL_GRACE_S = 5.0
_MAX_ERROR_MESSAGE = 500


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class RunStream(Response):
    media_type = "text/event-stream"

    def __init__(
        self, engine: FlowEngine, flow: DeployedFlow, request: RunRequest, timeout_s: float,
        redact: Callable[[str], str],
    ) -> None:
        super().__init__(status_code=200)
        self._engine = engine
        self._flow = flow
        self._request = request
        self._timeout_s = timeout_s
        self._redact = redact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        queue: asyncio.Queue[str] = asyncio.Queue()
        run = asyncio.create_task(self._engine.run(self._flow, self._request, queue))
        run.add_done_callback(lambda _: queue.put_nowait(_WAKE))
        gone = asyncio.create_task(wait_for_disconnect(receive))
        gone.add_done_callback(lambda _: queue.put_nowait(_WAKE))
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        try:
            streamed = await self._relay(queue, run, gone, deadline, send)
            if streamed is not None:
                await send({"type": "http.response.body", "body": self._last_event(run, streamed)})
        finally:
            gone.cancel()
            if not run.done():
                run.cancel()
                await asyncio.wait({run}, timeout=_CANCEL_GRACE_S)

    async def _relay(
        self, queue: asyncio.Queue[str], run: asyncio.Task[RunResult], gone: asyncio.Task[None],
        deadline: float, send: Send,
    ) -> list[str] | None:
        """Relay tokens until the run ends; None when the client left or the run timed out."""
        loop = asyncio.get_running_loop()
        streamed: list[str] = []
        while True:
            if queue.empty():
                try:
                    async with asyncio.timeout(max(deadline - loop.time(), 0)):
                        text = await queue.get()
                except TimeoutError:
                    if not run.done():
                        log.warning("run of flow %s timed out", self._flow.flow_id)
                        timeout = RunTimeout(f"the run took longer than {self._timeout_s:g} s")
                        await send({"type": "http.response.body", "body": _error(timeout)})
                        return None
                    text = _WAKE
            else:
                text = queue.get_nowait()
            if gone.done():
                return None
            batch = []
            while text != _WAKE:
                batch.append(sse("token", {"text": text}))
                streamed.append(text)
                text = queue.get_nowait() if not queue.empty() else _WAKE
            if batch:
                body = b"".join(batch)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            if run.done() and queue.empty():
                return streamed

    def _last_event(self, run: asyncio.Task[RunResult], streamed: list[str]) -> bytes:
        if run.cancelled():
            error: BaseException | None = asyncio.CancelledError("the run was cancelled")
        else:
            error = run.exception()
        if error is not None:
            log.warning("run of flow %s failed: %s", self._flow.flow_id, self._redact(str(error)))
            message = self._redact(str(error) or type(error).__name__)[:_MAX_ERROR_MESSAGE]
            return _error(RunError(f"the flow failed: {message}"))
        result = run.result()
        text = result.text if result.text is not None else "".join(streamed)
        usage = {"input_tokens": result.input_tokens, "output_tokens": result.output_tokens}
        return sse("end", {"text": text, "session_id": self._request.session_id, "usage": usage})


def _error(error: RunError) -> bytes:
    return sse("error", {"code": error.code, "message": error.message})
