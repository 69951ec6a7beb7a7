"""The mock LLM and the runtime as real processes for the session; tests deploy their own flows."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from devstack import services
from devstack.procs import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-runtime-service-token-0123"
RUN_TIMEOUT_S = 3.0
MOCK_ANSWER_TOKENS = 12
UNSENT_VARIABLE = "collection"
UNSENT_VARIABLE_IN_ENV = "collection-from-the-runtime-environment"


@dataclass
class Service:
    process: ManagedProcess
    url: str


def runtime_process(
    name: str, port: int, log_dir: Path, flows_dir: Path, llm_url: str
) -> ManagedProcess:
    env = {
        "RUNTIME_PORT": str(port),
        "RUNTIME_SERVICE_TOKEN": TOKEN,
        "RUNTIME_RUN_TIMEOUT_S": str(RUN_TIMEOUT_S),
        "RUNTIME_FLOWS_DIR": str(flows_dir),
        "RUNTIME_LLM_BASE_URL": f"{llm_url}/v1",
        "RUNTIME_LLM_API_KEY": "sk-test-runtime-key",
    }
    process = services.python_service(name, "runtime", port, log_dir, env)
    process.cwd = ROOT
    return process


def mock_llm_process(name: str, port: int, log_dir: Path, pace: dict[str, str]) -> ManagedProcess:
    """`python -m runtime.mockllm` on `port`; `pace` holds its MOCKLLM_* settings."""
    env = {"MOCKLLM_PORT": str(port), **pace}
    process = services.python_service(name, "runtime.mockllm", port, log_dir, env)
    process.cwd = ROOT
    return process


def serve_mock_llm(name: str, stack_dir: Path, pace: dict[str, str]) -> Iterator[Service]:
    """A mock LLM of its own on a free port, paced by `pace` (MOCKLLM_* settings)."""
    port = free_port()
    process = mock_llm_process(name, port, stack_dir / "runtime", pace)
    process.start()
    process.wait_ready(30)
    yield Service(process, f"http://127.0.0.1:{port}")
    process.stop()


@pytest.fixture(scope="session")
def mock_llm(stack_dir: Path) -> Iterator[Service]:
    yield from serve_mock_llm("mockllm", stack_dir, {
        "MOCKLLM_FIRST_TOKEN_MS": "20",
        "MOCKLLM_TOKENS_PER_S": "400",
        "MOCKLLM_SLOW_TOKEN_MS": "500",
        "MOCKLLM_ANSWER_TOKENS": str(MOCK_ANSWER_TOKENS),
    })


@pytest.fixture(scope="session")
def runtime_service(stack_dir: Path, mock_llm: Service) -> Iterator[Service]:
    port = free_port()
    process = runtime_process(
        "runtime", port, stack_dir / "runtime", stack_dir / "runtime" / "flows", mock_llm.url
    )
    # A global variable of variables_flow, set where only a fallback to the runtime's own
    # environment would find it: a run that does not send it must not see this value.
    process.env = {**process.env, UNSENT_VARIABLE: UNSENT_VARIABLE_IN_ENV}
    process.start()
    process.wait_ready(120)
    yield Service(process, f"http://127.0.0.1:{port}")
    process.stop()


@pytest.fixture
async def runtime(runtime_service: Service) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the session's runtime, holding the service token."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        base_url=runtime_service.url, headers=headers, timeout=30
    ) as client:
        yield client


@pytest.fixture
async def mock_client(mock_llm: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock_llm.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
def demo_flow_json() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROOT / "runtime/flows/demo.json").read_text())
    return loaded


@pytest.fixture
def demo_flow(demo_flow_json: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(demo_flow_json)


@pytest.fixture(scope="session")
def variables_flow() -> dict[str, Any]:
    """The demo flow with a prompt that reads three global variables, built from lfx components.

    Built in a child process so that importing lfx cannot touch this test process.
    """
    script = (
        "import json, sys\n"
        "from runtime.flows.build_demo import build_flow\n"
        "flow = build_flow(\n"
        "    template='Tenant {tenant} agent {agent} in {collection} asks: {question}',\n"
        "    prompt_variables={'tenant': 'tenant_id', 'agent': 'agent_id',\n"
        "                      'collection': 'collection'})\n"
        "json.dump(flow, sys.stdout)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, check=True, timeout=180
    )
    built: dict[str, Any] = json.loads(done.stdout)
    return built


@pytest.fixture
async def deployed(runtime: httpx.AsyncClient, demo_flow: dict[str, Any]) -> AsyncIterator[str]:
    """A fresh id with the demo flow deployed under it, undeployed afterwards."""
    flow_id = f"demo-{uuid.uuid4().hex[:10]}"
    response = await runtime.put(f"/flows/{flow_id}", json={"version": 1, "flow": demo_flow})
    assert response.status_code == 200, response.text
    yield flow_id
    await runtime.delete(f"/flows/{flow_id}")


async def stream_events(
    client: httpx.AsyncClient, flow_id: str, text: str, *,
    session_id: str = "session-1", variables: dict[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    body = {"input_value": text, "session_id": session_id, "variables": variables or {}}
    events = []
    async with aconnect_sse(client, "POST", f"/flows/{flow_id}/stream", json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for event in source.aiter_sse():
            events.append((event.event, json.loads(event.data)))
    return events
