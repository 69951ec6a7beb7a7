"""A seller's pasted flow: refused naming the node when it is not a safe Langflow export of
installed components, with pasted secrets stripped and reported, never stored."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import asyncpg
import pytest

from tests.cmp.api.sellers import (
    create,
    flow_error,
    node,
    template,
)
from tests.cmp.conftest import MakeUser

# Flow validation


async def test_foreign_component_code_is_refused_naming_the_node(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    template(demo_flow, "Prompt-sk002")["code"]["value"] += "\nimport os  # the seller's own\n"
    problem = flow_error(await create(seller, demo_flow))
    assert "Prompt-sk002" in problem
    assert "differs from the installed" in problem
    assert await db.fetchval("SELECT count(*) FROM provider_agents") == 0


async def test_two_chat_outputs_are_refused_naming_both(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    second = copy.deepcopy(node(demo_flow, "ChatOutput-sk004"))
    second["id"] = "ChatOutput-sk005"
    demo_flow["data"]["nodes"].append(second)
    edge = copy.deepcopy(next(e for e in demo_flow["data"]["edges"]
                              if e["target"] == "ChatOutput-sk004"))
    edge["id"] = "second-output-edge"
    edge["target"] = "ChatOutput-sk005"
    demo_flow["data"]["edges"].append(edge)
    problem = flow_error(await create(seller, demo_flow))
    assert "exactly one chat output" in problem
    assert "ChatOutput-sk004" in problem and "ChatOutput-sk005" in problem


async def test_a_flow_without_chat_input_is_refused(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    demo_flow["data"]["nodes"] = [n for n in demo_flow["data"]["nodes"]
                                  if n["id"] != "ChatInput-sk001"]
    demo_flow["data"]["edges"] = [e for e in demo_flow["data"]["edges"]
                                  if e["source"] != "ChatInput-sk001"]
    problem = flow_error(await create(seller, demo_flow))
    assert "chat input (ChatInput)" in problem and "has none" in problem


async def test_unknown_component_type_is_refused_naming_the_node(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    node(demo_flow, "Prompt-sk002")["data"]["type"] = "RemoteShell"
    problem = flow_error(await create(seller, demo_flow))
    assert "Prompt-sk002" in problem and "RemoteShell" in problem


async def test_broken_edges_are_refused_by_lfx_validation(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    demo_flow["data"]["edges"][0]["target"] = "Nowhere-000"
    assert "non-existent node" in flow_error(await create(seller, demo_flow))


async def test_oversize_flow_is_refused_naming_the_limit(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    demo_flow["description"] = "x" * (1024 * 1024)
    response = await create(seller, demo_flow)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert "1 MiB" in error["message"] and "1048576 bytes" in error["fields"]["flow"]
    assert await db.fetchval("SELECT count(*) FROM provider_agents") == 0


@pytest.mark.parametrize("flow", [[], "a flow", 7, {"name": "no data"}, {"data": {"nodes": 3}}])
async def test_a_flow_that_is_not_a_langflow_export_is_refused(
    make_user: MakeUser, flow: Any
) -> None:
    seller = await make_user("provider")
    response = await create(seller, flow)
    assert response.status_code == 422, response.text
    assert "flow" in response.json()["error"]["fields"]


async def test_pasted_api_key_is_stripped_reported_and_never_stored(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    secret = "sk-live-PASTED-0123456789abcdef"
    template(demo_flow, "OpenAIModel-sk003")["api_key"].update(value=secret, load_from_db=False)
    response = await create(seller, demo_flow)
    assert response.status_code == 201, response.text
    assert secret not in response.text
    version = response.json()["version"]
    assert version["stripped_secrets"] == ["OpenAIModel-sk003.api_key"]
    assert any("OpenAIModel-sk003" in w and "api_key" in w for w in version["warnings"])

    agent_id = uuid.UUID(response.json()["provider_agent_id"])
    row = await db.fetchrow("SELECT flow::text AS flow, stripped_secrets, warnings"
                            " FROM provider_agent_versions WHERE provider_agent_id = $1", agent_id)
    assert secret not in row["flow"]
    assert row["stripped_secrets"] == ["OpenAIModel-sk003.api_key"]
    api_key = template(json.loads(row["flow"]), "OpenAIModel-sk003")["api_key"]
    assert api_key["value"] == "SITEKIT_LLM_API_KEY" and api_key["load_from_db"] is True
    dumped = await db.fetchval("SELECT string_agg(details::text, ' ') FROM audit_log")
    assert secret not in dumped
    stored = await seller.client.get(f"/api/provider-agents/{agent_id}/versions/1")
    assert secret not in stored.text


async def test_pasted_key_where_the_runtime_gives_none_is_removed_and_the_flow_refused(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    """A model pointed at its own endpoint would send the buyer's chats with the seller's key,
    which the CMP does not keep: the field is emptied, so lfx finds a required input empty."""
    seller = await make_user("provider")
    secret = "sk-live-ELSEWHERE-0123456789"
    fields = template(demo_flow, "OpenAIModel-sk003")
    fields["openai_api_base"].update(value="https://llm.example.test/v1", load_from_db=False)
    fields["api_key"].update(value=secret, load_from_db=False)
    response = await create(seller, demo_flow)
    problem = flow_error(response)
    assert secret not in response.text
    assert "OpenAIModel-sk003" in problem and "api_key" in problem
    assert "SITEKIT_LLM_API_KEY" in problem
    assert await db.fetchval("SELECT count(*) FROM provider_agent_versions") == 0


