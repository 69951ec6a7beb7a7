"""Chats reach the runtime over the runtime link (the default: numbered runs on WebSockets) or
over HTTP/1.1 (GATEWAY_RUNTIME_TRANSPORT=http, one connection per run). Both give the same
answers, and a visitor who leaves cancels the run all the way to the LLM."""

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
    llm_stats,
    sse_events,
)


@pytest.fixture(scope="module")
def http_gateway(stack: Stack) -> Iterator[str]:
    """One more gateway worker on the session's stack, calling the runtime over HTTP/1.1."""
    with extra_gateway(stack, "gateway-http-runtime", {"GATEWAY_RUNTIME_TRANSPORT": "http"}) as url:
        yield url


@pytest.fixture(params=["link", "http"])
def gateway_url(request: pytest.FixtureRequest, stack: Stack) -> str:
    if request.param == "link":
        return stack.gateway_url
    url: str = request.getfixturevalue("http_gateway")
    return url


async def test_concurrent_chats_each_get_their_own_answer(
    gateway_url: str, tenant: Tenant, usage: UsageReader
) -> None:
    async def chat(client: httpx.AsyncClient, n: int) -> tuple[int, list[tuple[str, dict]]]:
        response = await client.post(
            tenant.chat_path, json={"message": f"Question {n} #echo"},
            headers={**auth(tenant.secret_key), **SSE})
        return response.status_code, sse_events(response.text)

    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        answers = await asyncio.gather(*(chat(client, n) for n in range(8)))
    request_ids = set()
    for n, (status, events) in enumerate(answers):
        assert status == 200
        assert events[-1][0] == "end" and {name for name, _ in events[:-1]} == {"token"}
        assert f"Question {n}" in events[-1][1]["text"]
        request_ids.add(events[-1][1]["request_id"])
    found = await usage.collect(request_ids)
    assert {found[r][0]["data"]["status"] for r in request_ids} == {"completed"}


async def test_a_visitor_who_leaves_cancels_the_run_at_the_llm(
    gateway_url: str, stack: Stack, tenant: Tenant, usage: UsageReader
) -> None:
    cancelled_before = (await llm_stats(stack))["streams_cancelled"]
    request_id = await leave_after_first_token(gateway_url, tenant)
    found = await usage.collect({request_id})
    assert found[request_id][0]["data"]["status"] == "cancelled"
    for _ in range(100):
        if (await llm_stats(stack))["streams_cancelled"] > cancelled_before:
            break
        await asyncio.sleep(0.05)
    assert (await llm_stats(stack))["streams_cancelled"] >= cancelled_before + 1
