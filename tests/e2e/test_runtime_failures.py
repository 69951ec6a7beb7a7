"""A runtime that fails or stops answering, seen by a client that asked for one JSON answer:
502 `runtime_error` or 504 `runtime_timeout`, with the contract's error body, and a failed
usage event."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from devstack.stack import Stack
from tests.e2e.conftest import (
    MakeTenant,
    UsageReader,
    auth,
    extra_gateway,
    scripted_runtime,
)
from tests.gateway.raw_server import WAIT

RUN_TIMEOUT_S = 1  # the least GATEWAY_RUN_TIMEOUT_S takes


@pytest.fixture(scope="module")
def impatient_gateway(stack: Stack) -> Iterator[str]:
    """A gateway worker that waits RUN_TIMEOUT_S for the runtime's answer and each next byte."""
    env = {"GATEWAY_RUN_TIMEOUT_S": str(RUN_TIMEOUT_S)}
    with extra_gateway(stack, "gateway-impatient", env) as url:
        yield url


def assert_error_answer(response: httpx.Response, status: int, code: str) -> str:
    """The contract's error answer; its request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert error == {"code": code, "message": error["message"], "request_id": request_id}
    assert isinstance(error["message"], str) and error["message"]
    return request_id


async def test_a_run_the_llm_breaks_off_is_502(
    gateway: httpx.AsyncClient, make_tenant: MakeTenant, usage: UsageReader
) -> None:
    tenant = await make_tenant()
    response = await gateway.post(tenant.chat_path, json={"message": "Break off #fail"},
                                  headers=auth(tenant.secret_key))
    request_id = assert_error_answer(response, 502, "runtime_error")
    found = await usage.collect({request_id})
    assert found[request_id][0]["data"]["status"] == "failed"


def error_event(code: str) -> bytes:
    data = orjson.dumps({"code": code, "message": f"the run failed ({code})"})
    return b"event: error\ndata: " + data + b"\n\n"


TOKEN = b'event: token\ndata: {"text": "Hel"}\n\n'


@pytest.mark.parametrize(("events", "then_hold", "status", "code"), [
    pytest.param(None, True, 504, "runtime_timeout", id="never-answers"),
    pytest.param(TOKEN, True, 504, "runtime_timeout", id="falls-silent-after-a-token"),
    pytest.param(TOKEN + error_event("runtime_timeout"), False, 504, "runtime_timeout",
                 id="its-run-timed-out"),
    pytest.param(TOKEN + error_event("runtime_error"), False, 502, "runtime_error",
                 id="its-run-failed"),
])
async def test_a_runtime_that_fails_or_falls_silent_gets_the_contracts_error(
    impatient_gateway: str, make_tenant: MakeTenant, usage: UsageReader, events: bytes | None,
    then_hold: bool, status: int, code: str,
) -> None:
    async with scripted_runtime(events, then_hold=then_hold) as runtime:
        tenant = await make_tenant(runtime_url=runtime.url(""))
        async with httpx.AsyncClient(base_url=impatient_gateway, timeout=30) as client:
            response = await client.post(tenant.chat_path, json={"message": "hello"},
                                         headers=auth(tenant.secret_key))
        request_id = assert_error_answer(response, status, code)
        runs: list[dict[str, Any]] = runtime.runs
        assert [run["variables"]["request_id"] for run in runs] == [request_id]
        if then_hold:  # the gateway gave the run up: it closed the runtime's connection
            async with asyncio.timeout(WAIT):
                await runtime.eof_seen.wait()
    found = await usage.collect({request_id})
    assert found[request_id][0]["data"]["status"] == "failed"
