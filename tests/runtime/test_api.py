"""Deploy, list, undeploy, health and the service token, against the real runtime process."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.runtime.conftest import Service


async def test_health_needs_no_token(runtime_service: Service) -> None:
    async with httpx.AsyncClient(base_url=runtime_service.url) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", "Basic abc"])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/flows"), ("PUT", "/flows/x"), ("DELETE", "/flows/x"), ("POST", "/flows/x/stream")],
)
async def test_everything_else_needs_the_token(
    runtime_service: Service, authorization: str | None, method: str, path: str
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(base_url=runtime_service.url, headers=headers) as client:
        response = await client.request(method, path, json={})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


async def test_deploy_list_undeploy(runtime: httpx.AsyncClient, demo_flow: dict[str, Any]) -> None:
    flow_id = f"agent-{uuid.uuid4().hex[:8]}"
    response = await runtime.put(f"/flows/{flow_id}", json={"version": 3, "flow": demo_flow})
    assert response.status_code == 200
    assert response.json() == {"flow_id": flow_id, "version": 3}
    listed = (await runtime.get("/flows")).json()["flows"]
    assert {"flow_id": flow_id, "version": 3} in listed

    response = await runtime.put(f"/flows/{flow_id}", json={"version": 4, "flow": demo_flow})
    assert response.json() == {"flow_id": flow_id, "version": 4}
    listed = (await runtime.get("/flows")).json()["flows"]
    assert [f for f in listed if f["flow_id"] == flow_id] == [{"flow_id": flow_id, "version": 4}]

    assert (await runtime.delete(f"/flows/{flow_id}")).status_code == 204
    assert flow_id not in {f["flow_id"] for f in (await runtime.get("/flows")).json()["flows"]}
    again = await runtime.delete(f"/flows/{flow_id}")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "flow_not_found"


async def test_unknown_flow_is_404(runtime: httpx.AsyncClient) -> None:
    body = {"input_value": "hi", "session_id": "s", "variables": {}}
    response = await runtime.post("/flows/no-such-flow/stream", json=body)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "flow_not_found"
    assert "no-such-flow" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"version": -1},
        {"version": "1"},
        {"version": True},
        {"version": 1, "flow": "not an object"},
        {"version": 1, "flow": {"id": "x", "name": "x", "data": {"nodes": "nope", "edges": []}}},
    ],
)
async def test_bad_deploys_are_refused(runtime: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await runtime.put("/flows/bad-deploy", json=body)
    assert response.status_code in (400, 422)
    assert response.json()["error"]["code"] in ("invalid_request", "invalid_flow")
    assert (await runtime.delete("/flows/bad-deploy")).status_code == 404


async def test_bad_flow_ids_and_bodies(runtime: httpx.AsyncClient, deployed: str) -> None:
    response = await runtime.put("/flows/..%2Fescape", json={"version": 1, "flow": {}})
    assert response.status_code in (400, 404)
    response = await runtime.post(
        f"/flows/{deployed}/stream", content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    response = await runtime.post(f"/flows/{deployed}/stream", json={"input_value": 3})
    assert response.status_code == 400
    reserved = {"input_value": "hi", "variables": {"SITEKIT_LLM_API_KEY": "mine"}}
    response = await runtime.post(f"/flows/{deployed}/stream", json=reserved)
    assert response.status_code == 400
    assert "reserved" in response.json()["error"]["message"]
