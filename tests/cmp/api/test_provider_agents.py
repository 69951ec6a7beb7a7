"""Sellers' agents: immutable versions, publishing, price and limits, the marketplace;
tenancy (another organisation's agent is 404) and roles. The checks of a pasted flow are in
test_provider_agent_flows."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.cmp.api.sellers import (
    NASTY,
    PRICE,
    create,
    created,
    flow_error,
    snapshot,
    template,
)
from tests.cmp.conftest import MakeUser

# The seller journey


async def test_seller_pastes_the_demo_flow_publishes_and_it_is_in_the_marketplace(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    buyer = await make_user("customer")
    agent = await created(seller, demo_flow)
    agent_id = agent["provider_agent_id"]
    assert agent["org_id"] == str(seller.org_id)
    assert agent["current_version"] == 1 and agent["published"] is False
    assert agent["version"]["version"] == 1
    assert agent["version"]["stripped_secrets"] == []
    assert agent["price"] == PRICE
    assert agent["limits"] == {"tenant": {"rate": 50.0, "burst": 100},
                               "key": {"rate": 10.0, "burst": 20}}

    assert (await buyer.client.get(f"/api/marketplace/{agent_id}")).status_code == 404
    listed = (await buyer.client.get("/api/marketplace")).json()["items"]
    assert agent_id not in [a["provider_agent_id"] for a in listed]

    published = await seller.client.post(f"/api/provider-agents/{agent_id}/publish")
    assert published.status_code == 200, published.text
    assert published.json()["published"] is True

    listed = (await buyer.client.get("/api/marketplace")).json()["items"]
    [entry] = [a for a in listed if a["provider_agent_id"] == agent_id]
    assert entry["provider_org_id"] == str(seller.org_id)
    assert entry["provider_name"] == f"Org of {seller.email}"
    assert entry["name"] == "Support bot" and entry["price"] == PRICE
    assert entry["current_version"] == 1
    assert "flow" not in entry
    one = await buyer.client.get(f"/api/marketplace/{agent_id}")
    assert one.status_code == 200 and one.json() == entry

    actions = [r["action"] for r in await db.fetch(
        "SELECT action FROM audit_log WHERE object_id = $1 ORDER BY audit_id", agent_id)]
    assert actions == ["provider_agent.create", "provider_agent.publish"]


async def test_unpublished_agent_leaves_the_marketplace(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("both")
    agent_id = (await created(seller, demo_flow))["provider_agent_id"]
    await seller.client.post(f"/api/provider-agents/{agent_id}/publish")
    response = await seller.client.post(f"/api/provider-agents/{agent_id}/unpublish")
    assert response.status_code == 200 and response.json()["published"] is False
    assert (await seller.client.get(f"/api/marketplace/{agent_id}")).status_code == 404
    listed = (await seller.client.get("/api/marketplace")).json()["items"]
    assert agent_id not in [a["provider_agent_id"] for a in listed]


async def test_publish_and_unpublish_are_idempotent_and_audited_once(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    agent_id = (await created(seller, demo_flow))["provider_agent_id"]
    for _ in range(2):
        response = await seller.client.post(f"/api/provider-agents/{agent_id}/publish")
        assert response.status_code == 200 and response.json()["published"] is True
    for _ in range(2):
        response = await seller.client.post(f"/api/provider-agents/{agent_id}/unpublish")
        assert response.status_code == 200 and response.json()["published"] is False
    actions = [r["action"] for r in await db.fetch(
        "SELECT action FROM audit_log WHERE object_id = $1 ORDER BY audit_id", agent_id)]
    assert actions == ["provider_agent.create", "provider_agent.publish",
                       "provider_agent.unpublish"]


async def test_publish_checks_the_current_version_again(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    """A version stored before the installed components changed is refused at publish."""
    seller = await make_user("provider")
    agent_id = (await created(seller, demo_flow))["provider_agent_id"]
    template(demo_flow, "Prompt-sk002")["code"]["value"] += "\n# an older release\n"
    await db.execute(
        "INSERT INTO provider_agent_versions (provider_agent_id, version, flow)"
        " VALUES ($1, 2, $2)", uuid.UUID(agent_id), json.dumps(demo_flow))
    await db.execute("UPDATE provider_agents SET current_version = 2"
                     " WHERE provider_agent_id = $1", uuid.UUID(agent_id))
    response = await seller.client.post(f"/api/provider-agents/{agent_id}/publish")
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert "version 2" in error["message"]
    assert "Prompt-sk002" in error["fields"]["current_version"]
    agent = (await seller.client.get(f"/api/provider-agents/{agent_id}")).json()
    assert agent["published"] is False


# Price, limits and the other fields


@pytest.mark.parametrize(("price", "field"), [
    ({"amount": 0, "currency": "EUR"}, "amount"),
    ({"amount": 12.5, "currency": "EUR"}, "amount"),
    ({"amount": 100, "currency": "eur"}, "currency"),
    ({"amount": 100, "currency": "EURO"}, "currency"),
    ({"amount": 100}, "currency"),
    ({"stripe_price_id": "prod_123"}, "stripe_price_id"),
    ({"stripe_price_id": "price_1", "amount": 100, "currency": "EUR"}, "price"),
    ({}, "price"),
])
async def test_bad_prices_are_refused_per_field(
    make_user: MakeUser, demo_flow: dict[str, Any], price: dict[str, Any], field: str
) -> None:
    seller = await make_user("provider")
    response = await create(seller, demo_flow, price=price)
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["fields"]
    assert any(name.startswith("price") and field in name for name in fields), fields


async def test_a_stripe_price_and_custom_limits_are_kept(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    limits = {"tenant": {"rate": 5.5, "burst": 30}, "key": {"rate": 1.0, "burst": 3}}
    agent = await created(seller, demo_flow, price={"stripe_price_id": "price_1AbC"},
                          limits=limits)
    fetched = (await seller.client.get(f"/api/provider-agents/{agent['provider_agent_id']}"))
    assert fetched.json()["price"] == {"stripe_price_id": "price_1AbC"}
    assert fetched.json()["limits"] == limits


@pytest.mark.parametrize("limits", [
    {"tenant": {"rate": 0, "burst": 10}, "key": {"rate": 1, "burst": 1}},
    {"tenant": {"rate": 10, "burst": 0}, "key": {"rate": 1, "burst": 1}},
    {"tenant": {"rate": 100_000, "burst": 10}, "key": {"rate": 1, "burst": 1}},
    {"tenant": {"rate": 10, "burst": 10}, "key": {"rate": 20, "burst": 5}},
    {"tenant": {"rate": 10, "burst": 10}, "key": {"rate": 5, "burst": 50}},
    {"tenant": {"rate": 10, "burst": 10}},
])
async def test_bad_limits_are_refused(
    make_user: MakeUser, demo_flow: dict[str, Any], limits: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    response = await create(seller, demo_flow, limits=limits)
    assert response.status_code == 422, response.text
    assert any(name.startswith("limits") for name in response.json()["error"]["fields"])


@pytest.mark.parametrize(("change", "field"), [
    ({"name": ""}, "name"), ({"name": "x" * 201}, "name"), ({"name": "a\u0000b"}, "name"),
    ({"description": "d" * 4001}, "description"), ({"unknown": 1}, "unknown"),
    ({"org_id": "not-a-uuid"}, "org_id"),
])
async def test_bad_fields_are_refused_by_name(
    make_user: MakeUser, demo_flow: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    seller = await make_user("provider")
    response = await create(seller, demo_flow, **change)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["fields"]


async def test_sql_metacharacters_and_unicode_are_kept_verbatim(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    agent = await created(seller, demo_flow, name=NASTY, description=NASTY * 3)
    agent_id = agent["provider_agent_id"]
    assert agent["name"] == NASTY and agent["description"] == NASTY * 3
    changed = await seller.client.patch(f"/api/provider-agents/{agent_id}",
                                        json={"name": NASTY[::-1], "description": ""})
    assert changed.status_code == 200, changed.text
    fetched = (await seller.client.get(f"/api/provider-agents/{agent_id}")).json()
    assert fetched["name"] == NASTY[::-1] and fetched["description"] == ""
    await seller.client.post(f"/api/provider-agents/{agent_id}/publish")
    listed = (await seller.client.get(f"/api/marketplace/{agent_id}")).json()
    assert listed["name"] == NASTY[::-1]


async def test_a_customer_organisation_cannot_sell(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    buyer = await make_user("customer")
    response = await create(buyer, demo_flow)
    assert response.status_code == 403, response.text
    assert "customer organisation" in response.json()["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM provider_agents") == 0


async def test_creating_in_an_organisation_you_are_not_in_is_404(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    stranger = await make_user("provider")
    body = {"org_id": str(seller.org_id), "name": "n", "flow": demo_flow, "price": PRICE}
    response = await stranger.client.post("/api/provider-agents", json=body)
    assert response.status_code == 404, response.text
    assert await db.fetchval("SELECT count(*) FROM provider_agents") == 0


# Updates and versions


async def test_patch_changes_only_what_is_sent(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    agent = await created(seller, demo_flow)
    agent_id = agent["provider_agent_id"]
    response = await seller.client.patch(
        f"/api/provider-agents/{agent_id}", json={"price": {"stripe_price_id": "price_9"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["price"] == {"stripe_price_id": "price_9"}
    assert body["name"] == agent["name"] and body["limits"] == agent["limits"]
    assert body["current_version"] == 1
    details = await db.fetchval("SELECT details::text FROM audit_log WHERE action ="
                                " 'provider_agent.update' AND object_id = $1", agent_id)
    assert json.loads(details) == {"fields": ["price"]}


@pytest.mark.parametrize("change", [{}, {"name": None}, {"limits": None},
                                    {"flow": {}}, {"published": True}])
async def test_patch_refuses_empty_null_and_unknown_fields(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection,
    change: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    agent_id = (await created(seller, demo_flow))["provider_agent_id"]
    before = await snapshot(db, agent_id)
    response = await seller.client.patch(f"/api/provider-agents/{agent_id}", json=change)
    assert response.status_code == 422, response.text
    assert await snapshot(db, agent_id) == before


async def test_a_new_flow_is_a_new_immutable_version(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    agent_id = (await created(seller, demo_flow))["provider_agent_id"]
    template(demo_flow, "Prompt-sk002")["template"]["value"] = "Answer in French: {question}"
    response = await seller.client.post(f"/api/provider-agents/{agent_id}/versions",
                                        json={"flow": demo_flow})
    assert response.status_code == 201, response.text
    assert response.json()["version"] == 2
    assert response.json()["created_by"] == str(seller.user_id)
    agent = (await seller.client.get(f"/api/provider-agents/{agent_id}")).json()
    assert agent["current_version"] == 2

    first = (await seller.client.get(f"/api/provider-agents/{agent_id}/versions/1")).json()
    second = (await seller.client.get(f"/api/provider-agents/{agent_id}/versions/2")).json()
    assert "French" not in json.dumps(first["flow"])
    assert "French" in json.dumps(second["flow"])

    page = (await seller.client.get(f"/api/provider-agents/{agent_id}/versions?limit=1")).json()
    assert [v["version"] for v in page["items"]] == [1] and "flow" not in page["items"][0]
    rest = (await seller.client.get(
        f"/api/provider-agents/{agent_id}/versions?limit=1&cursor={page['next_cursor']}")).json()
    assert [v["version"] for v in rest["items"]] == [2] and rest["next_cursor"] is None

    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="immutable"):
        await db.execute("UPDATE provider_agent_versions SET flow = '{}'"
                         " WHERE provider_agent_id = $1", uuid.UUID(agent_id))


async def test_an_invalid_new_version_changes_nothing(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    seller = await make_user("provider")
    agent_id = (await created(seller, demo_flow))["provider_agent_id"]
    before = await snapshot(db, agent_id)
    template(demo_flow, "OpenAIModel-sk003")["code"]["value"] = "print('hello')"
    response = await seller.client.post(f"/api/provider-agents/{agent_id}/versions",
                                        json={"flow": demo_flow})
    assert "OpenAIModel-sk003" in flow_error(response)
    assert await snapshot(db, agent_id) == before


@pytest.mark.parametrize("version", ["3", "0", "-1", "abc", "99999999999999"])
async def test_missing_versions_are_404(
    make_user: MakeUser, demo_flow: dict[str, Any], version: str
) -> None:
    seller = await make_user("provider")
    agent_id = (await created(seller, demo_flow))["provider_agent_id"]
    response = await seller.client.get(f"/api/provider-agents/{agent_id}/versions/{version}")
    assert response.status_code == 404, response.text


# Listing


async def test_list_filters_by_organisation_and_published_and_pages(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    seller = await make_user("provider")
    other_org = (await seller.client.post(
        "/api/organisations", json={"name": "Second shop", "kind": "both"})).json()["org_id"]
    first = (await created(seller, demo_flow))["provider_agent_id"]
    second = (await created(seller, demo_flow, org_id=other_org))["provider_agent_id"]
    third = (await created(seller, demo_flow))["provider_agent_id"]
    await seller.client.post(f"/api/provider-agents/{third}/publish")

    async def ids(query: str) -> list[str]:
        response = await seller.client.get(f"/api/provider-agents{query}")
        assert response.status_code == 200, response.text
        return [a["provider_agent_id"] for a in response.json()["items"]]

    assert await ids("") == [first, second, third]
    assert await ids(f"?org_id={seller.org_id}") == [first, third]
    assert await ids(f"?org_id={other_org}") == [second]
    assert await ids("?published=true") == [third]
    assert await ids("?published=false") == [first, second]
    page = (await seller.client.get("/api/provider-agents?limit=2")).json()
    assert [a["provider_agent_id"] for a in page["items"]] == [first, second]
    assert await ids(f"?limit=2&cursor={page['next_cursor']}") == [third]
    bad = await seller.client.get("/api/provider-agents?published=maybe")
    assert bad.status_code == 422 and "published" in bad.json()["error"]["fields"]


async def test_marketplace_lists_every_providers_published_agents_and_pages(
    make_user: MakeUser, demo_flow: dict[str, Any], api: httpx.AsyncClient
) -> None:
    shop_a = await make_user("provider")
    shop_b = await make_user("both")
    buyer = await make_user("customer")
    a = (await created(shop_a, demo_flow))["provider_agent_id"]
    b = (await created(shop_b, demo_flow))["provider_agent_id"]
    await created(shop_b, demo_flow)  # never published
    for seller, agent_id in ((shop_a, a), (shop_b, b)):
        await seller.client.post(f"/api/provider-agents/{agent_id}/publish")

    page = (await buyer.client.get("/api/marketplace?limit=1")).json()
    rest = (await buyer.client.get(f"/api/marketplace?cursor={page['next_cursor']}")).json()
    assert [x["provider_agent_id"] for x in page["items"] + rest["items"]] == [a, b]
    only_b = (await buyer.client.get(f"/api/marketplace?provider_org_id={shop_b.org_id}"))
    assert [x["provider_agent_id"] for x in only_b.json()["items"]] == [b]
    assert (await api.get("/api/marketplace")).status_code == 401
    assert (await api.get(f"/api/marketplace/{a}")).status_code == 401
    assert (await buyer.client.get("/api/marketplace/not-an-id")).status_code == 404


# Tenancy and roles


async def test_another_organisations_agent_is_404_everywhere_and_unchanged(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    owner = await make_user("provider")
    intruder = await make_user("provider")
    agent_id = (await created(owner, demo_flow))["provider_agent_id"]
    before = await snapshot(db, agent_id)
    one = f"/api/provider-agents/{agent_id}"
    attempts = [
        intruder.client.get(one),
        intruder.client.patch(one, json={"name": "mine now"}),
        intruder.client.get(f"{one}/versions"),
        intruder.client.get(f"{one}/versions/1"),
        intruder.client.post(f"{one}/versions", json={"flow": demo_flow}),
        intruder.client.post(f"{one}/publish"),
        intruder.client.post(f"{one}/unpublish"),
    ]
    for attempt in attempts:
        response = await attempt
        assert response.status_code == 404, (response.request.url, response.text)
        assert response.json()["error"]["code"] == "not_found"
    listed = await intruder.client.get(f"/api/provider-agents?org_id={owner.org_id}")
    assert listed.json()["items"] == []
    assert await snapshot(db, agent_id) == before


async def test_a_member_reads_but_does_not_write(
    make_user: MakeUser, demo_flow: dict[str, Any], db: asyncpg.Connection
) -> None:
    owner = await make_user("provider")
    member = await make_user(org_id=owner.org_id, role="member")
    agent_id = (await created(owner, demo_flow))["provider_agent_id"]
    before = await snapshot(db, agent_id)
    one = f"/api/provider-agents/{agent_id}"
    for path in (one, f"{one}/versions", f"{one}/versions/1", "/api/provider-agents"):
        assert (await member.client.get(path)).status_code == 200, path
    writes = [
        create(member, demo_flow),
        member.client.patch(one, json={"name": "renamed"}),
        member.client.post(f"{one}/versions", json={"flow": demo_flow}),
        member.client.post(f"{one}/publish"),
        member.client.post(f"{one}/unpublish"),
    ]
    for attempt in writes:
        response = await attempt
        assert response.status_code == 403, (response.request.url, response.text)
        assert "admin" in response.json()["error"]["message"]
    assert await snapshot(db, agent_id) == before
    assert await db.fetchval("SELECT count(*) FROM provider_agents") == 1


async def test_an_admin_writes(
    make_user: MakeUser, demo_flow: dict[str, Any]
) -> None:
    owner = await make_user("provider")
    admin = await make_user(org_id=owner.org_id, role="admin")
    agent_id = (await created(admin, demo_flow))["provider_agent_id"]
    response = await admin.client.post(f"/api/provider-agents/{agent_id}/publish")
    assert response.status_code == 200 and response.json()["published"] is True


async def test_the_openapi_document_describes_the_endpoints(make_user: MakeUser) -> None:
    # make_user, not the anonymous `api` alone: with only `api`, the app's shutdown hangs
    # (a CMP core issue, reported to the lead).
    reader = await make_user("provider")
    document = (await reader.client.get("/openapi.json")).json()
    paths = document["paths"]
    assert set(paths["/api/provider-agents/{provider_agent_id}"]) == {"get", "patch"}
    assert "409" in paths["/api/provider-agents/{provider_agent_id}/publish"]["post"]["responses"]
    assert "/api/marketplace/{provider_agent_id}" in paths
    change = document["components"]["schemas"]["ProviderAgentChange"]
    for field in ("name", "description", "price", "limits"):
        assert "null" not in json.dumps(change["properties"][field]), field
    assert change["additionalProperties"] is False
