"""A chat's cycle in the gateway's own protocol is freed when its request ends: nothing of it is
left for the garbage collector, whose young collections would otherwise stop the worker for
milliseconds every few thousand chats."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

from gateway.http import ChatCycle
from gateway.metrics import GatewayMetrics
from gateway.reply import Reply


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


class Protocol:
    """What a ChatCycle uses of uvicorn's protocol."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.server_state = SimpleNamespace(default_headers=[(b"server", b"sitekit")])
        self.loop = asyncio.get_running_loop()
        self.flow = SimpleNamespace(resume_reading=_nothing, pause_reading=_nothing,
                                    write_paused=False)
        self.completed = 0

    def on_response_complete(self) -> None:
        self.completed += 1


def _nothing() -> None:
    pass


class Endpoint:
    """Reads the body and answers it back whole, as a chat endpoint answers a refusal."""

    async def handle(
        self, headers: list[tuple[bytes, bytes]], agent_id: str, request_id: str, reply: Reply
    ) -> int:
        body = await reply.body(1024)
        await reply.whole(200, body, [(b"x-request-id", request_id.encode())])
        return 200


async def test_a_finished_chat_leaves_nothing_for_the_garbage_collector() -> None:
    protocol = Protocol()
    cycle: Any = ChatCycle(
        protocol, Endpoint(), GatewayMetrics(), "agent-1",  # type: ignore[arg-type]
        [(b"host", b"gateway"), (b"content-type", b"application/json")],
        keep_alive=True, expect_continue=False,
    )
    task = asyncio.create_task(cycle.run())
    await asyncio.sleep(0)  # the cycle waits for its body
    cycle.feed(b'{"message": "hi"}')
    cycle.message_event.set()  # as uvicorn's protocol wakes a cycle
    cycle.body_complete()
    await task
    assert protocol.completed == 1 and cycle.response_complete
    head, _, body = protocol.transport.written[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b'{"message": "hi"}'
    del task

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        del cycle
        gc.collect()
        left = [kind.__name__ for kind in {type(o) for o in gc.garbage}]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
