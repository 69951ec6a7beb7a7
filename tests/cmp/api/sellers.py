"""Helpers for the sellers' tests: the demo flow, a valid body, and reading refusals."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import orjson

from devstack.seed import DEMO_FLOW as DEMO_FLOW_PATH
from tests.cmp.conftest import User

DEMO_FLOW: dict[str, Any] = orjson.loads(DEMO_FLOW_PATH.read_bytes())
PRICE = {"amount": 1900, "currency": "EUR"}
NASTY = "Robert'); DROP TABLE provider_agents;-- \\ % _ \" ü 日本語 🚀 \u202e"


def node(flow: dict[str, Any], node_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(n for n in flow["data"]["nodes"] if n["id"] == node_id)
    return found


def template(flow: dict[str, Any], node_id: str) -> dict[str, Any]:
    found: dict[str, Any] = node(flow, node_id)["data"]["node"]["template"]
    return found


async def create(user: User, flow: dict[str, Any], **fields: Any) -> httpx.Response:
    body = {"org_id": str(user.org_id), "name": "Support bot", "description": "Answers",
            "flow": flow, "price": PRICE, **fields}
    return await user.client.post("/api/provider-agents", json=body)


async def created(user: User, flow: dict[str, Any], **fields: Any) -> dict[str, Any]:
    response = await create(user, flow, **fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def flow_error(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    problem: str = error["fields"]["flow"]
    assert problem in error["message"]
    return problem


async def snapshot(db: asyncpg.Connection, agent_id: str) -> tuple[Any, ...]:
    """Everything a write could change about one agent."""
    agent = await db.fetchrow("SELECT * FROM provider_agents WHERE provider_agent_id = $1",
                              uuid.UUID(agent_id))
    versions = await db.fetch("SELECT * FROM provider_agent_versions WHERE provider_agent_id = $1"
                              " ORDER BY version", uuid.UUID(agent_id))
    audits = await db.fetchval("SELECT count(*) FROM audit_log WHERE object_id = $1", agent_id)
    return dict(agent), [dict(v) for v in versions], audits
