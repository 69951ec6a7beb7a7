"""Text fields keep exactly what was sent: SQL metacharacters, quotes, placeholders, markup
and any Unicode come back byte for byte. NUL, which PostgreSQL text cannot hold, is refused by
name rather than silently dropped."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from devstack.seed import DEMO_FLOW
from tests.cmp.api.test_orders import provisioned
from tests.cmp.conftest import MakeUser, PublishedAgent

pytestmark = pytest.mark.provisions

NASTY = [
    "Robert'); DROP TABLE organisations;--",
    "100% _off_ \\ $1 $$ $tag$ ' \" ` ;",
    "<script>alert('x')</script> &amp; {{7*7}}",
    "Zoë · 中文 · עברית · \u202eevil\u202c · e\u0301 · 💥🏳️‍🌈",
    "  spaced  \t and \n multi-line  ",
]


@pytest.mark.parametrize("text", NASTY)
async def test_every_text_field_comes_back_verbatim(
    api: httpx.AsyncClient, make_user: MakeUser, published_agent: PublishedAgent, text: str,
) -> None:
    owner = await make_user("both")
    org = await owner.client.post("/api/organisations", json={"name": text, "kind": "both"})
    assert org.json()["name"] == text
    token = await owner.client.post("/api/tokens", json={"name": text})
    assert token.json()["name"] == text
    listed = (await owner.client.get("/api/tokens")).json()["items"]
    assert text in [t["name"] for t in listed]

    created = await published_agent.provider.client.post("/api/provider-agents", json={
        "org_id": str(published_agent.provider.org_id), "name": text, "description": text,
        "flow": orjson.loads(DEMO_FLOW.read_bytes()),
        "price": {"amount": 100, "currency": "EUR"}})
    assert created.status_code == 201, created.text
    fetched = (await published_agent.provider.client.get(
        f"/api/provider-agents/{created.json()['provider_agent_id']}")).json()
    assert (fetched["name"], fetched["description"]) == (text, text)

    agent_id = await provisioned(api, owner, published_agent)
    changed: dict[str, Any] = (await owner.client.patch(
        f"/api/customer-agent-configs/{agent_id}",
        json={"display_name": text, "greeting": text, "starter_prompts": [text]})).json()
    again = (await owner.client.get(f"/api/customer-agent-configs/{agent_id}")).json()
    for config in (changed, again):
        assert config["display_name"] == config["greeting"] == text
        assert config["starter_prompts"] == [text]
    audit = (await owner.client.get(
        f"/api/audit-log?object_id={org.json()['org_id']}")).json()["items"]
    assert audit[0]["details"]["name"] == text


async def test_nul_is_refused_by_field_name(make_user: MakeUser) -> None:
    owner = await make_user()
    response = await owner.client.post("/api/organisations",
                                       json={"name": "before\u0000after", "kind": "both"})
    assert response.status_code == 422
    assert list(response.json()["error"]["fields"]) == ["name"]
