"""Runs of the demo flow through the real runtime and the mock LLM: tokens, end, errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from httpx_sse import aconnect_sse

from tests.runtime.conftest import (
    RUN_TIMEOUT_S,
    UNSENT_VARIABLE,
    UNSENT_VARIABLE_IN_ENV,
    Service,
    stream_events,
)


def split(events: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[tuple[str, Any]]]:
    tokens = [data["text"] for name, data in events if name == "token"]
    others = [(name, data) for name, data in events if name != "token"]
    return tokens, others


async def wait_for_stats(
    mock_client: httpx.AsyncClient, predicate: Any, timeout: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = (await mock_client.get("/_stats")).json()
        if predicate(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


async def test_tokens_stream_in_order_then_end(runtime: httpx.AsyncClient, deployed: str) -> None:
    question = "#tokens=9 where is my parcel"
    events = await stream_events(runtime, deployed, question, session_id="s-42")
    tokens, others = split(events)
    assert len(tokens) == 9
    assert [name for name, _ in events[:-1]] == ["token"] * 9
    assert others[0][0] == "end" and len(others) == 1
    end = others[0][1]
    assert end["text"] == "".join(tokens)
    assert end["text"].startswith("You asked about")
    assert end["session_id"] == "s-42"
    assert end["usage"]["output_tokens"] == 9
    # The mock counts prompt words: the demo template's words plus the question's.
    assert end["usage"]["input_tokens"] > 4


async def test_a_session_id_is_made_when_none_is_given(
    runtime: httpx.AsyncClient, deployed: str
) -> None:
    body = {"input_value": "#tokens=2 hi"}
    async with aconnect_sse(runtime, "POST", f"/flows/{deployed}/stream", json=body) as source:
        events = [(e.event, e.json()) async for e in source.aiter_sse()]
    assert events[-1][0] == "end"
    assert len(events[-1][1]["session_id"]) >= 16


async def test_twenty_runs_in_flight(runtime: httpx.AsyncClient, deployed: str) -> None:
    # Each answer is paced by #slow (the session's mock: 0.5 s a token), about 1.5 s in all;
    # served one at a time, the first run would end before the second run's first token.
    runs = 20
    timeline: list[tuple[str, int]] = []

    async def run(i: int) -> list[tuple[str, dict[str, Any]]]:
        # The mock's answer echoes the message's last six words, so r{i} is its fourth word.
        body = {"input_value": f"#slow #tokens=4 r{i} of twenty at once here",
                "session_id": f"s-{i}", "variables": {}}
        events = []
        async with aconnect_sse(runtime, "POST", f"/flows/{deployed}/stream", json=body) as sse:
            async for event in sse.aiter_sse():
                timeline.append((event.event, i))
                events.append((event.event, event.json()))
        return events

    # The process's first run builds the component classes; twenty at once after it stay
    # well within the run timeout.
    assert (await stream_events(runtime, deployed, "#tokens=1 warm up"))[-1][0] == "end"
    results = await asyncio.gather(*(run(i) for i in range(runs)))
    first_end = next(n for n, (name, _) in enumerate(timeline) if name != "token")
    started = {i for name, i in timeline[:first_end] if name == "token"}
    assert started == set(range(runs)), f"runs without a token before the first end: {timeline}"
    for i, events in enumerate(results):
        tokens, others = split(events)
        assert len(tokens) == 4
        assert others == [("end", others[0][1])]
        assert others[0][1]["text"] == "".join(tokens) == f"You asked about r{i}."
        assert others[0][1]["session_id"] == f"s-{i}"


def llm_connections(runtime_service: Service, mock_llm: Service) -> dict[int, str]:
    """The runtime's TCP connections to the mock LLM: the state of each, by local port."""
    assert runtime_service.process.popen is not None
    runtime = psutil.Process(runtime_service.process.popen.pid)
    port = urlsplit(mock_llm.url).port
    return {
        connection.laddr.port: connection.status
        for process in (runtime, *runtime.children(recursive=True))
        for connection in process.net_connections(kind="tcp")
        if connection.raddr and connection.raddr.port == port
    }


def open_llm_connections(runtime_service: Service, mock_llm: Service) -> set[int]:
    connections = llm_connections(runtime_service, mock_llm)
    return {port for port, status in connections.items() if status == psutil.CONN_ESTABLISHED}


async def test_turns_reuse_a_kept_alive_llm_connection(
    runtime: httpx.AsyncClient, deployed: str, mock_client: httpx.AsyncClient,
    runtime_service: Service, mock_llm: Service,
) -> None:
    # A turn sends its LLM request over a connection an earlier turn left in the pool: no
    # new connection (for a remote LLM, no TCP and TLS handshake) per turn.
    assert (await stream_events(runtime, deployed, "#tokens=3 warm up"))[-1][0] == "end"
    kept = open_llm_connections(runtime_service, mock_llm)
    assert kept, "the runtime closed its LLM connection at the end of the turn"
    before = (await mock_client.get("/_stats")).json()
    for i in range(5):
        assert (await stream_events(runtime, deployed, f"#tokens=3 turn {i}"))[-1][0] == "end"
        held = open_llm_connections(runtime_service, mock_llm)
        assert held, f"turn {i} closed its LLM connection"
        assert held <= kept, f"turn {i} opened a new LLM connection: {held - kept}"
    after = (await mock_client.get("/_stats")).json()
    assert after["chat_requests"] == before["chat_requests"] + 5


async def test_llm_failure_mid_run_is_an_error_event(
    runtime: httpx.AsyncClient, deployed: str, mock_client: httpx.AsyncClient,
    runtime_service: Service, mock_llm: Service,
) -> None:
    before = (await mock_client.get("/_stats")).json()
    connections_before = len(llm_connections(runtime_service, mock_llm))
    events = await stream_events(runtime, deployed, "#fail #tokens=10 please")
    tokens, others = split(events)
    assert len(tokens) == 3  # the mock drops the connection after three tokens
    assert [name for name, _ in others] == ["error"]
    assert others[0][1]["code"] == "runtime_error"
    assert others[0][1]["message"]
    # Nothing of the run is left: no stream open at the LLM, no request made again, and no
    # connection to the LLM kept by the runtime (one the LLM closed would be CLOSE_WAIT).
    after = await wait_for_stats(mock_client, lambda s: s["streams_open"] == 0)
    assert after["streams_open"] == 0
    assert after["streams_failed"] == before["streams_failed"] + 1
    assert after["chat_requests"] == before["chat_requests"] + 1
    deadline = time.monotonic() + 5
    while True:
        left = llm_connections(runtime_service, mock_llm)
        freed = "CLOSE_WAIT" not in left.values() and len(left) <= connections_before
        if freed or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert "CLOSE_WAIT" not in left.values()
    assert len(left) <= connections_before, left
    # The worker is still healthy and serves the next run; by its end, the failed run has
    # not opened another LLM stream either.
    tokens, others = split(await stream_events(runtime, deployed, "#tokens=4 again"))
    assert len(tokens) == 4 and others[-1][0] == "end"
    last = await wait_for_stats(mock_client, lambda s: s["streams_open"] == 0)
    assert last["streams_open"] == 0
    assert last["chat_requests"] == before["chat_requests"] + 2


async def test_a_run_past_its_deadline_is_a_timeout_and_stops_the_llm(
    runtime: httpx.AsyncClient, deployed: str, mock_client: httpx.AsyncClient
) -> None:
    before = (await mock_client.get("/_stats")).json()
    started = time.monotonic()
    events = await stream_events(runtime, deployed, "#slow #tokens=40 take your time")
    elapsed = time.monotonic() - started
    tokens, others = split(events)
    assert [name for name, _ in others] == ["error"]
    assert others[0][1]["code"] == "runtime_timeout"
    assert 0 < len(tokens) < 40
    assert RUN_TIMEOUT_S <= elapsed < RUN_TIMEOUT_S + 3
    stats = await wait_for_stats(
        mock_client, lambda s: s["streams_cancelled"] > before["streams_cancelled"]
    )
    assert stats["streams_cancelled"] == before["streams_cancelled"] + 1


async def test_client_disconnect_cancels_the_run(
    runtime: httpx.AsyncClient, deployed: str, mock_client: httpx.AsyncClient
) -> None:
    before = (await mock_client.get("/_stats")).json()
    marker = uuid.uuid4().hex
    body = {"input_value": f"#slow #tokens=40 {marker}", "session_id": "s", "variables": {}}
    async with aconnect_sse(runtime, "POST", f"/flows/{deployed}/stream", json=body) as source:
        async for event in source.aiter_sse():
            assert event.event == "token"
            break  # leaving the block closes the connection mid-answer
    # Well within the run timeout (3 s), whose end would also cancel the LLM's stream.
    stats = await wait_for_stats(
        mock_client, lambda s: s["streams_cancelled"] > before["streams_cancelled"], timeout=1.5
    )
    assert stats["streams_cancelled"] == before["streams_cancelled"] + 1
    assert any(marker in message for message in stats["last_user_messages"])
    assert stats["streams_completed"] == before["streams_completed"]


@pytest.fixture
async def variables_deployed(
    runtime: httpx.AsyncClient, variables_flow: dict[str, Any]
) -> AsyncIterator[str]:
    flow_id = f"vars-{uuid.uuid4().hex[:8]}"
    response = await runtime.put(f"/flows/{flow_id}", json={"version": 1, "flow": variables_flow})
    assert response.status_code == 200, response.text
    yield flow_id
    await runtime.delete(f"/flows/{flow_id}")


async def test_request_variables_reach_the_components(
    runtime: httpx.AsyncClient, variables_deployed: str, mock_client: httpx.AsyncClient
) -> None:
    flow_id = variables_deployed
    tenant, collection = f"t{uuid.uuid4().hex[:8]}", f"c{uuid.uuid4().hex[:8]}"
    agent = f"a{uuid.uuid4().hex[:8]}"
    variables = {"tenant_id": tenant, "agent_id": agent, "collection": collection,
                 "request_id": "r1"}
    events = await stream_events(runtime, flow_id, "#tokens=3 hello", variables=variables)
    assert events[-1][0] == "end"
    stats = (await mock_client.get("/_stats")).json()
    prompt = stats["last_user_messages"][-1]
    assert prompt == f"Tenant {tenant} agent {agent} in {collection} asks: #tokens=3 hello"
    # A concurrent run with other variables sees only its own.
    other = {"tenant_id": "tenantB", "agent_id": "agentB", "collection": "collB"}
    both = await asyncio.gather(
        stream_events(runtime, flow_id, "#tokens=12 first", variables=variables),
        stream_events(runtime, flow_id, "#tokens=12 second", variables=other),
    )
    assert tenant in both[0][-1][1]["text"] or collection in both[0][-1][1]["text"]
    assert "collB" in both[1][-1][1]["text"]
    assert tenant not in both[1][-1][1]["text"]


async def test_a_variable_the_request_leaves_out_is_not_read_from_the_environment(
    runtime: httpx.AsyncClient, variables_deployed: str, mock_client: httpx.AsyncClient
) -> None:
    # The runtime's environment holds UNSENT_VARIABLE (tests/runtime/conftest.py).
    marker = uuid.uuid4().hex
    variables = {"tenant_id": "tenantC", "agent_id": "agentC"}
    assert UNSENT_VARIABLE not in variables
    events = await stream_events(
        runtime, variables_deployed, f"#tokens=3 {marker}", variables=variables
    )
    assert events[-1][0] == "end"
    stats = (await mock_client.get("/_stats")).json()
    prompt = next(m for m in stats["last_user_messages"] if marker in m)
    assert UNSENT_VARIABLE_IN_ENV not in prompt
    # lfx resolves a global variable that nothing provides to None.
    assert prompt == f"Tenant tenantC agent agentC in None asks: #tokens=3 {marker}"
