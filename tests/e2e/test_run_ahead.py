"""Runs that start before the rate limiter's decision (gateway.admission), on one gateway worker
and a runtime the test scripts: the run overlaps the limiter's round trip; a chat the limiter
refuses after all (its key's tokens spent elsewhere meanwhile) or cannot decide gets the 429 or
503 it would have got anyway, its run is cancelled and it has no usage event; a key seen refused
waits for the limiter before its next run, and so does a chat that comes while the worker has
many checks waiting on Redis; with GATEWAY_RUN_AHEAD=off no run starts early."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis

from cmp.registry import Limits
from devstack.stack import Stack
from gateway.chat import RUN_AHEAD_MAX_UNDECIDED
from ratelimit.buckets import BucketLimit
from ratelimit.limiter import BucketLimiter
from tests.e2e.conftest import (
    SSE,
    MakeTenant,
    ScriptedRuntime,
    Tenant,
    UsageReader,
    auth,
    extra_gateway,
    llm_stats,
    scripted_runtime,
)
from tests.gateway.raw_server import WAIT

TOKEN = b'event: token\ndata: {"text": "Hel"}\n\n'
END = (b'event: end\ndata: {"text": "Hello", '
       b'"usage": {"input_tokens": 3, "output_tokens": 1}}\n\n')
BURST = 3
LIMITS = Limits(tenant=BucketLimit(100, 1000), key=BucketLimit(0.001, BURST))
LIMITER_TIMEOUT_S = 1.0  # the gateway's GATEWAY_REDIS_TIMEOUT default


@pytest.fixture(scope="module", params=["gateway", "asgi"])
def one_worker(request: pytest.FixtureRequest, stack: Stack) -> Iterator[str]:
    """A gateway of one worker, so that every chat of a test meets the same forecast; with the
    gateway's own HTTP protocol for chats, then with uvicorn's and ASGI."""
    env = {"GATEWAY_HTTP": request.param}
    with extra_gateway(stack, f"gateway-run-ahead-{request.param}", env) as url:
        yield url


@pytest.fixture
async def client(one_worker: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=one_worker, timeout=30) as client:
        yield client


@pytest.fixture
async def limiter(stack: Stack) -> AsyncIterator[BucketLimiter]:
    """The limiter library on the stack's Redis: spends a key's tokens as another worker
    would."""
    limiter = BucketLimiter.from_url(stack.redis_url)
    yield limiter
    await limiter.aclose()


async def spend(limiter: BucketLimiter, tenant: Tenant, count: int) -> None:
    for _ in range(count):
        decision = await limiter.check(tenant.tenant_id, tenant.secret_key_id, LIMITS.tenant,
                                       LIMITS.key)
        assert decision.allowed


@contextlib.asynccontextmanager
async def seen_once(
    client: httpx.AsyncClient, make_tenant: MakeTenant
) -> AsyncIterator[tuple[ScriptedRuntime, Tenant, httpx.Response]]:
    """A tenant on a runtime that holds each run open after a token, and its first chat: decided
    before its run (the worker has no forecast for the key yet), which leaves BURST - 1 tokens;
    the client reads the token and hangs up."""
    async with scripted_runtime(TOKEN, then_hold=True) as runtime:
        tenant = await make_tenant(LIMITS, runtime_url=runtime.url(""))
        async with client.stream("POST", tenant.chat_path, json={"message": "hi"},
                                 headers={**auth(tenant.secret_key), **SSE}) as first:
            async for text in first.aiter_text():
                if "event: token" in text:
                    break
        assert first.headers["ratelimit-remaining"] == str(BURST - 1)
        await wait_for(lambda: runtime.eofs == 1, "the first run's end")
        yield runtime, tenant, first


async def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def started_ahead(metrics: str, decision: str) -> float:
    prefix = f'gateway_chats_started_ahead_total{{decision="{decision}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


async def test_the_run_starts_while_the_limiter_decides(
    client: httpx.AsyncClient, make_tenant: MakeTenant, stack_redis: aioredis.Redis,
    usage: UsageReader,
) -> None:
    async with scripted_runtime(TOKEN + END) as runtime:
        tenant = await make_tenant(LIMITS, runtime_url=runtime.url(""))
        first = await client.post(tenant.chat_path, json={"message": "hi"},
                                  headers=auth(tenant.secret_key))
        assert first.status_code == 200
        assert first.headers["ratelimit-remaining"] == str(BURST - 1)
        # Redis holds every script for 600 ms, well within the limiter's timeout.
        await stack_redis.execute_command("CLIENT", "PAUSE", "600", "WRITE")
        paused = time.monotonic()
        chat = asyncio.create_task(client.post(tenant.chat_path, json={"message": "hi"},
                                               headers=auth(tenant.secret_key)))
        await wait_for(lambda: len(runtime.runs) == 2, "the second run")
        assert time.monotonic() - paused < 0.6  # the run started before the decision could
        assert not chat.done()  # and nothing reached the client before it
        response = await chat
        assert time.monotonic() - paused >= 0.55
    assert response.status_code == 200
    assert response.json()["text"] == "Hello"
    assert response.headers["ratelimit-remaining"] == str(BURST - 2)
    assert response.headers["ratelimit-limit"] == str(BURST)
    request_id = response.headers["x-request-id"]
    found = await usage.collect({request_id})
    assert [e["data"]["status"] for e in found[request_id]] == ["completed"]
    deadline = time.monotonic() + WAIT  # the metrics are copied in once a second
    while started_ahead((await client.get("/metrics")).text, "admitted") < 1:
        assert time.monotonic() < deadline, "no chat counted as started ahead and admitted"
        await asyncio.sleep(0.1)


async def test_a_refusal_after_the_start_cancels_the_run_and_bills_nothing(
    client: httpx.AsyncClient, make_tenant: MakeTenant, limiter: BucketLimiter,
    stack_redis: aioredis.Redis, usage: UsageReader,
) -> None:
    before = started_ahead((await client.get("/metrics")).text, "refused")
    async with seen_once(client, make_tenant) as (runtime, tenant, first):
        # Another worker spends the two tokens this one believes are left.
        await spend(limiter, tenant, BURST - 1)
        # Redis holds the decision until the run has surely reached the runtime (a refusal that
        # comes sooner stops it on its way, which leaves nothing to see there).
        await stack_redis.execute_command("CLIENT", "PAUSE", "300", "WRITE")
        refused = await client.post(tenant.chat_path, json={"message": "hi"},
                                    headers=auth(tenant.secret_key))
        assert len(runtime.runs) == 2  # it started ahead,
        await wait_for(lambda: runtime.eofs == 2, "the refused run's cancellation")  # and ended
        # Now known to be out of tokens: refused before any run starts.
        again = await client.post(tenant.chat_path, json={"message": "hi"},
                                  headers=auth(tenant.secret_key))
        assert len(runtime.runs) == 2
    for response in (refused, again):
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "rate_limited"
        assert error["request_id"] == response.headers["x-request-id"]
        assert response.headers["ratelimit-remaining"] == "0"
        assert response.headers["ratelimit-limit"] == str(BURST)
        assert int(response.headers["retry-after"]) >= 1
    ids = {first.headers["x-request-id"], refused.headers["x-request-id"],
           again.headers["x-request-id"]}
    found = await usage.collect(ids, timeout=3.0)  # those that come do within milliseconds
    assert {rid: [e["data"]["status"] for e in found.get(rid, [])] for rid in ids} == {
        first.headers["x-request-id"]: ["cancelled"],
        refused.headers["x-request-id"]: [],
        again.headers["x-request-id"]: [],
    }
    # Copied into the metrics once a second: the usage events' wait above gave it time.
    assert started_ahead((await client.get("/metrics")).text, "refused") >= before + 1


async def test_over_the_runtime_link_a_refused_run_is_cancelled_at_the_llm(
    client: httpx.AsyncClient, stack: Stack, make_tenant: MakeTenant, limiter: BucketLimiter,
    stack_redis: aioredis.Redis,
) -> None:
    tenant = await make_tenant(LIMITS)  # on the stack's runtime, over the link
    first = await client.post(tenant.chat_path, json={"message": "hi"},
                              headers=auth(tenant.secret_key))
    assert first.headers["ratelimit-remaining"] == str(BURST - 1)
    await spend(limiter, tenant, BURST - 1)
    before = await llm_stats(stack)
    # Redis holds the decision long enough for the run to reach the LLM, which answers slowly.
    await stack_redis.execute_command("CLIENT", "PAUSE", "500", "WRITE")
    chat = asyncio.create_task(client.post(
        tenant.chat_path, json={"message": "Go slowly #slow"},
        headers={**auth(tenant.secret_key), **SSE}))
    deadline = time.monotonic() + WAIT
    while (await llm_stats(stack))["streams_open"] == before["streams_open"]:
        assert time.monotonic() < deadline, "the run never reached the LLM"
        await asyncio.sleep(0.02)
    response = await chat
    assert response.status_code == 429, response.text
    while (await llm_stats(stack))["streams_cancelled"] == before["streams_cancelled"]:
        assert time.monotonic() < deadline + WAIT, "the refused run still streams at the LLM"
        await asyncio.sleep(0.05)
    after = await llm_stats(stack)
    assert after["streams_open"] == before["streams_open"]
    assert after["streams_completed"] == before["streams_completed"]


async def test_a_limiter_that_cannot_decide_a_started_run_gets_503_and_cancels_it(
    client: httpx.AsyncClient, make_tenant: MakeTenant, stack_redis: aioredis.Redis,
    usage: UsageReader,
) -> None:
    async with seen_once(client, make_tenant) as (runtime, tenant, _):
        await stack_redis.execute_command(
            "CLIENT", "PAUSE", str(int(LIMITER_TIMEOUT_S * 1000 + 1500)), "WRITE")
        try:
            response = await client.post(tenant.chat_path, json={"message": "hi"},
                                         headers={**auth(tenant.secret_key), **SSE})
            assert len(runtime.runs) == 2
            await wait_for(lambda: runtime.eofs == 2, "the run's cancellation")
        finally:
            await stack_redis.execute_command("CLIENT", "UNPAUSE")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"] == "1"
    request_id = response.headers["x-request-id"]
    assert await usage.collect({request_id}, timeout=3.0) == {}


async def test_a_client_gone_before_the_decision_is_billed_once_admitted(
    client: httpx.AsyncClient, make_tenant: MakeTenant, stack_redis: aioredis.Redis,
    usage: UsageReader,
) -> None:
    async with seen_once(client, make_tenant) as (runtime, tenant, _):
        await stack_redis.execute_command("CLIENT", "PAUSE", "600", "WRITE")
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as leaving:
            chat = asyncio.create_task(leaving.post(
                tenant.chat_path, json={"message": "hi"},
                headers={**auth(tenant.secret_key), **SSE}))
            await wait_for(lambda: len(runtime.runs) == 2, "the second run")
            chat.cancel()  # hangs up while the limiter is still deciding
        await wait_for(lambda: runtime.eofs == 2, "the run's cancellation")
        request_id = runtime.requests[-1].split(b"x-request-id: ", 1)[1].split(b"\r\n")[0]
    found = await usage.collect({request_id.decode()})
    assert [e["data"]["status"] for e in found[request_id.decode()]] == ["cancelled"]


async def test_with_run_ahead_off_no_run_starts_before_its_decision(
    stack: Stack, make_tenant: MakeTenant, stack_redis: aioredis.Redis,
) -> None:
    async with scripted_runtime(TOKEN + END) as runtime:
        tenant = await make_tenant(LIMITS, runtime_url=runtime.url(""))
        with extra_gateway(stack, "gateway-no-run-ahead", {"GATEWAY_RUN_AHEAD": "off"}) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = await client.post(tenant.chat_path, json={"message": "hi"},
                                          headers=auth(tenant.secret_key))
                assert first.status_code == 200
                await stack_redis.execute_command("CLIENT", "PAUSE", "500", "WRITE")
                paused = time.monotonic()
                chat = asyncio.create_task(client.post(
                    tenant.chat_path, json={"message": "hi"}, headers=auth(tenant.secret_key)))
                await wait_for(lambda: len(runtime.runs) == 2, "the second run")
                assert time.monotonic() - paused >= 0.45
                assert (await chat).status_code == 200


async def test_a_busy_worker_starts_only_a_few_runs_ahead(
    one_worker: str, client: httpx.AsyncClient, make_tenant: MakeTenant,
    stack_redis: aioredis.Redis,
) -> None:
    """While more checks than RUN_AHEAD_MAX_UNDECIDED wait on Redis, the next chats wait for
    their decisions too."""
    limits = Limits(tenant=BucketLimit(100, 1000), key=BucketLimit(0.001, 50))
    async with scripted_runtime(TOKEN + END) as runtime:
        tenant = await make_tenant(limits, runtime_url=runtime.url(""))
        assert (await client.post(tenant.chat_path, json={"message": "hi"},
                                  headers=auth(tenant.secret_key))).status_code == 200
        await stack_redis.execute_command("CLIENT", "PAUSE", "800", "WRITE")
        # Separate connections, so that the chats are in flight together.
        clients = [httpx.AsyncClient(base_url=one_worker, timeout=30) for _ in range(8)]
        try:
            chats = [asyncio.create_task(c.post(tenant.chat_path, json={"message": "hi"},
                                                headers=auth(tenant.secret_key)))
                     for c in clients]
            await wait_for(lambda: len(runtime.runs) == 1 + RUN_AHEAD_MAX_UNDECIDED,
                           "the runs started ahead")
            await asyncio.sleep(0.3)  # and no more, while Redis holds the others' decisions
            assert len(runtime.runs) == 1 + RUN_AHEAD_MAX_UNDECIDED
            statuses = [response.status_code for response in await asyncio.gather(*chats)]
        finally:
            for c in clients:
                await c.aclose()
        assert statuses == [200] * 8
        assert len(runtime.runs) == 9
