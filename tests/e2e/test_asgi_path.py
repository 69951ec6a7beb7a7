"""The chat path under plain ASGI (GATEWAY_HTTP=asgi: uvicorn's stock protocol, and what any
ASGI server such as granian runs): the same answers, refusals and usage as the gateway's own
protocol, which the rest of the suite exercises."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from devstack.stack import Stack
from tests.e2e.conftest import (
    SSE,
    Tenant,
    UsageReader,
    auth,
    extra_gateway,
    leave_after_first_token,
    sse_events,
)


@pytest.fixture(scope="module")
def asgi_gateway(stack: Stack) -> Iterator[str]:
    """One more gateway worker on the session's stack, serving chats through ASGI."""
    with extra_gateway(stack, "gateway-asgi", {"GATEWAY_HTTP": "asgi"}) as url:
        yield url


async def test_a_streamed_chat_and_its_usage(
    asgi_gateway: str, tenant: Tenant, usage: UsageReader
) -> None:
    async with httpx.AsyncClient(base_url=asgi_gateway, timeout=30) as client:
        response = await client.post(
            tenant.chat_path, json={"message": "Tell me a story #tokens=20"},
            headers={**auth(tenant.secret_key), **SSE})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["ratelimit-limit"].isdigit()
    events = sse_events(response.text)
    assert events[-1][0] == "end" and {name for name, _ in events[:-1]} == {"token"}
    end = events[-1][1]
    assert end["text"] == "".join(data["text"] for _, data in events[:-1])
    found = await usage.collect({end["request_id"]})
    assert found[end["request_id"]][0]["data"]["status"] == "completed"


async def test_a_whole_answer_and_a_refusal(asgi_gateway: str, tenant: Tenant) -> None:
    async with httpx.AsyncClient(base_url=asgi_gateway, timeout=30) as client:
        answer = await client.post(tenant.chat_path, json={"message": "Hi #echo"},
                                   headers=auth(tenant.secret_key))
        refused = await client.post(tenant.chat_path, json={"message": "Hi"},
                                    headers=auth("not-a-key"))
        too_large = await client.post(
            tenant.chat_path, content=b'{"message": "' + b"x" * 40_000 + b'"}',
            headers={**auth(tenant.secret_key), "content-type": "application/json"})
    assert answer.status_code == 200 and "Hi" in answer.json()["text"]
    assert answer.headers["x-request-id"] == answer.json()["request_id"]
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_key"
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "payload_too_large"


async def test_a_disconnect_cancels_the_run(
    asgi_gateway: str, tenant: Tenant, usage: UsageReader
) -> None:
    request_id = await leave_after_first_token(asgi_gateway, tenant)
    await asyncio.sleep(0)
    found = await usage.collect({request_id})
    assert found[request_id][0]["data"]["status"] == "cancelled"
