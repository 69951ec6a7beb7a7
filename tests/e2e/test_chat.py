"""The chat endpoint on the real stack: streaming, errors of the contract, limits and usage."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from cmp.registry import BucketLimit, Limits, load_instance, publish_entry, save_instance
from devstack.stack import Stack
from tests.e2e.conftest import (
    SSE,
    MakeTenant,
    Tenant,
    UsageReader,
    auth,
    leave_after_first_token,
    sse_events,
)


async def test_tokens_stream_in_order_before_the_end(
    stack: Stack, gateway: httpx.AsyncClient, tenant: Tenant, usage: UsageReader
) -> None:
    answer_tokens = 200
    arrivals: list[tuple[float, str]] = []
    async with gateway.stream(
        "POST", tenant.chat_path, json={"message": f"Tell me a story #tokens={answer_tokens}"},
        headers={**auth(tenant.secret_key), **SSE},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["ratelimit-limit"].isdigit()
        buffer = ""
        async for text in response.aiter_text():
            buffer += text
            arrivals.append((time.monotonic(), text))
    events = sse_events(buffer)
    names = [name for name, _ in events]
    assert names[-1] == "end" and set(names[:-1]) == {"token"}
    assert len(names) > 10
    tokens = "".join(data["text"] for name, data in events if name == "token")
    end = events[-1][1]
    assert end["text"] == tokens
    assert end["request_id"] == response.headers["x-request-id"]
    assert end["session_id"] and end["usage"]["output_tokens"] > 0
    # Streamed, not buffered: the body came in many pieces over time, the first token well
    # before the end, as the mock LLM paces them (the last one is due this long after the first).
    assert len(arrivals) > 3
    paced_s = (answer_tokens - 1) / stack.settings.llm_tokens_per_s
    first_token_at = arrived_at(arrivals, "event: token")
    assert arrived_at(arrivals, "event: end") - first_token_at >= paced_s / 2
    found = await usage.collect({end["request_id"]})
    event = found[end["request_id"]][0]
    assert event["specversion"] == "1.0" and event["type"] == "sitekit.usage.v1"
    assert event["subject"] == tenant.agent_id
    assert event["data"]["status"] == "completed"
    assert event["data"]["output_tokens"] == end["usage"]["output_tokens"]
    assert event["data"]["ttft_ms"] is not None


def arrived_at(arrivals: list[tuple[float, str]], text: str) -> float:
    """When the body received so far first held `text`."""
    body = ""
    for at, piece in arrivals:
        body += piece
        if text in body:
            return at
    raise AssertionError(f"{text!r} never arrived")


async def test_session_id_is_kept(gateway: httpx.AsyncClient, tenant: Tenant) -> None:
    response = await gateway.post(tenant.chat_path, headers=auth(tenant.secret_key),
                                  json={"message": "Hi", "session_id": "visitor-42"})
    assert response.json()["session_id"] == "visitor-42"


@pytest.mark.parametrize(("body", "content_type", "status", "code"), [
    (b"{not json", "application/json", 400, "invalid_request"),
    (b"[]", "application/json", 400, "invalid_request"),
    (b'{"message": ""}', "application/json", 400, "invalid_request"),
    (b'{"message": 42}', "application/json", 400, "invalid_request"),
    (b'{"message": "hi", "session_id": 7}', "application/json", 400, "invalid_request"),
    (b'{"message": "hi"}', "text/plain", 415, "unsupported_media_type"),
    (b'{"message": "' + b"x" * 40_000 + b'"}', "application/json", 413, "payload_too_large"),
])
async def test_bad_requests_get_clear_errors(
    gateway: httpx.AsyncClient, tenant: Tenant, body: bytes, content_type: str, status: int,
    code: str,
) -> None:
    response = await gateway.post(tenant.chat_path, content=body, headers={
        **auth(tenant.secret_key), "content-type": content_type})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


async def test_a_bucket_of_n_admits_exactly_n_across_workers(
    stack: Stack, make_tenant: MakeTenant
) -> None:
    burst = 7
    tenant = await make_tenant(Limits(tenant=BucketLimit(100, 1000),
                                      key=BucketLimit(0.001, burst)))
    # Separate connections spread the requests over both gateway workers.
    async def one() -> httpx.Response:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            return await client.post(tenant.chat_path, json={"message": "hi"},
                                     headers=auth(tenant.secret_key))

    responses = await asyncio.gather(*(one() for _ in range(40)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == burst
    assert statuses.count(429) == 40 - burst
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["ratelimit-remaining"] == "0"
    assert limited.headers["ratelimit-limit"] == str(burst)


async def test_suspended_agent_is_refused_within_a_second(
    gateway: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Connection,
    stack_redis: aioredis.Redis,
) -> None:
    assert (await gateway.post(tenant.chat_path, json={"message": "hi"},
                               headers=auth(tenant.secret_key))).status_code == 200
    instance = await load_instance(db, tenant.agent_id, tenant.tenant_id)
    fields = {name: getattr(instance, name) for name in type(instance).__slots__}
    suspended = await save_instance(db, type(instance)(**{**fields, "status": "suspended"}))
    await publish_entry(stack_redis, suspended)
    await asyncio.sleep(1.0)
    for _ in range(4):
        async with httpx.AsyncClient(base_url=str(gateway.base_url)) as fresh:
            response = await fresh.post(tenant.chat_path, json={"message": "hi"},
                                        headers=auth(tenant.secret_key))
        assert response.status_code == 403
        assert "suspended" in response.json()["error"]["message"]


async def test_every_completed_request_has_one_usage_event(
    gateway: httpx.AsyncClient, tenant: Tenant, usage: UsageReader
) -> None:
    responses = await asyncio.gather(*(
        gateway.post(tenant.chat_path, json={"message": f"question {i}"},
                     headers=auth(tenant.secret_key))
        for i in range(10)
    ))
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 10
    found = await usage.collect(ids, settle=1.0)
    assert {rid: len(events) for rid, events in found.items()} == dict.fromkeys(ids, 1)
    assert {e[0]["data"]["status"] for e in found.values()} == {"completed"}


def usage_events(metrics: str, status: str) -> float:
    """The workers' summed count of usage events with `status`, from /metrics."""
    prefix = f'gateway_usage_events_total{{status="{status}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


async def test_client_disconnect_cancels_the_run(
    stack: Stack, tenant: Tenant, usage: UsageReader
) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        cancelled_before = usage_events((await client.get("/metrics")).text, "cancelled")
    request_id = await leave_after_first_token(stack.gateway_url, tenant)
    found = await usage.collect({request_id})
    assert found[request_id][0]["data"]["status"] == "cancelled"
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        metrics = (await client.get("/metrics")).text
    assert usage_events(metrics, "cancelled") >= cancelled_before + 1


async def test_health_readiness_and_metrics(gateway: httpx.AsyncClient, tenant: Tenant) -> None:
    assert (await gateway.get("/healthz")).status_code == 200
    ready = await gateway.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    await gateway.post(tenant.chat_path, json={"message": "hi"}, headers=auth(tenant.secret_key))
    metrics = (await gateway.get("/metrics")).text
    for name in ("gateway_requests_total", "gateway_request_duration_seconds_bucket",
                 "gateway_upstream_ttft_seconds_bucket", "gateway_limiter_decisions_total",
                 "gateway_usage_spool_depth", "gateway_limiter_redis_round_trips_total",
                 "gateway_usage_delivery_total"):
        assert name in metrics, name
    assert 'route="chat",status="200"' in metrics
    assert 'gateway_usage_events_total{status="completed"}' in metrics
