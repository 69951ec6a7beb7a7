"""Flows whose code is not the installed components' code are refused at deploy."""

from __future__ import annotations

from typing import Any

import httpx


def node(flow: dict[str, Any], node_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(n for n in flow["data"]["nodes"] if n["id"] == node_id)
    return found


async def deploy(runtime: httpx.AsyncClient, flow_id: str, flow: dict[str, Any]) -> httpx.Response:
    return await runtime.put(f"/flows/{flow_id}", json={"version": 1, "flow": flow})


async def test_foreign_component_code_is_refused_naming_the_node(
    runtime: httpx.AsyncClient, demo_flow: dict[str, Any]
) -> None:
    code = node(demo_flow, "Prompt-sk002")["data"]["node"]["template"]["code"]
    code["value"] += "\nimport os  # a seller's addition\n"
    response = await deploy(runtime, "tampered", demo_flow)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_flow"
    assert "Prompt-sk002" in error["message"]
    assert "Prompt Template" in error["message"]
    assert "differs from the installed" in error["message"]
    assert (await runtime.delete("/flows/tampered")).status_code == 404


async def test_code_exported_as_lines_is_the_same_code(
    runtime: httpx.AsyncClient, demo_flow: dict[str, Any]
) -> None:
    code = node(demo_flow, "ChatInput-sk001")["data"]["node"]["template"]["code"]
    code["value"] = code["value"].split("\n")
    assert (await deploy(runtime, "code-as-lines", demo_flow)).status_code == 200
    assert (await runtime.delete("/flows/code-as-lines")).status_code == 204


async def test_unknown_component_type_is_refused(
    runtime: httpx.AsyncClient, demo_flow: dict[str, Any]
) -> None:
    node(demo_flow, "ChatOutput-sk004")["data"]["type"] = "RemoteShell"
    response = await deploy(runtime, "unknown-type", demo_flow)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "ChatOutput-sk004" in message
    assert "RemoteShell" in message


async def test_runtime_key_cannot_be_routed_into_a_prompt(
    runtime: httpx.AsyncClient, demo_flow: dict[str, Any]
) -> None:
    template = node(demo_flow, "OpenAIModel-sk003")["data"]["node"]["template"]
    template["system_message"].update({"value": "SITEKIT_LLM_API_KEY", "load_from_db": True})
    response = await deploy(runtime, "key-leak", demo_flow)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "OpenAIModel-sk003" in message
    assert "system_message" in message


async def test_broken_structure_is_refused_by_lfx_validation(
    runtime: httpx.AsyncClient, demo_flow: dict[str, Any]
) -> None:
    demo_flow["data"]["edges"][0]["target"] = "Nowhere-000"
    response = await deploy(runtime, "broken-edge", demo_flow)
    assert response.status_code == 422
    assert "non-existent node" in response.json()["error"]["message"]
