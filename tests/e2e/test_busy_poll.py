"""GATEWAY_BUSY_POLL_US: a worker started with it answers chats as usual, keeps its core busy
while chats come closer together than the window, and sleeps again once they stop."""

from __future__ import annotations

import asyncio
import time

import httpx

from devstack.stack import Stack
from loadtest import bench_gateway
from tests.e2e.conftest import SSE, Tenant, auth, extra_gateway_process, sse_events

WINDOW_US = 100_000  # the largest window the setting takes


def cpu_seconds(pid: int) -> float:
    return sum(bench_gateway.cpu_seconds(pid))


async def test_a_polling_worker_answers_and_sleeps_once_chats_stop(
    stack: Stack, tenant: Tenant,
) -> None:
    env = {"GATEWAY_BUSY_POLL_US": str(WINDOW_US)}
    with extra_gateway_process(stack, "gateway-busy-poll", env) as (process, url):
        assert process.popen is not None
        pid = process.popen.pid
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            streamed = await client.post(tenant.chat_path, json={"message": "hello"},
                                         headers={**auth(tenant.secret_key), **SSE})
            assert streamed.status_code == 200, streamed.text
            events = sse_events(streamed.text)
            assert [e for e, _ in events].count("token") >= 1 and events[-1][0] == "end"

            idle_before = cpu_seconds(pid)
            await asyncio.sleep(1)
            idle_before = cpu_seconds(pid) - idle_before

            busy = cpu_seconds(pid)
            started = time.monotonic()
            chats = []
            while time.monotonic() - started < 1.5:  # a chat starts every 50 ms, whatever
                chats.append(asyncio.create_task(client.post(  # the earlier ones are doing
                    tenant.chat_path, json={"message": f"hi {len(chats)}"},
                    headers=auth(tenant.secret_key))))
                await asyncio.sleep(0.05)
            for response in await asyncio.gather(*chats):
                assert response.status_code == 200, response.text
            busy = cpu_seconds(pid) - busy

            await asyncio.sleep(0.5)  # past the window
            idle_after = cpu_seconds(pid)
            await asyncio.sleep(1)
            idle_after = cpu_seconds(pid) - idle_after
    # Each chat's window overlapped the next one's, so the worker polled through those 1.5 s
    # instead of sleeping (answering the 30 chats alone takes about a tenth of it), and spent
    # nothing once they stopped.
    assert busy > 0.6, (busy, len(chats))
    assert idle_before < 0.2 and idle_after < 0.2, (idle_before, idle_after)
