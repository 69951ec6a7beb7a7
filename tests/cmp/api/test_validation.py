"""Bad input to the buyer's write endpoints gets 400/415/422 naming each field, and changes
nothing."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from cmp.api.webhook_signature import sign
from tests.cmp.conftest import WEBHOOK_SECRET, MakeUser

CASES: list[tuple[str, str, Any, set[str]]] = [
    ("POST", "/api/orders", {"org_id": "not-a-uuid"}, {"org_id", "provider_agent_id"}),
    ("POST", "/api/agent-api-keys", {"kind": "master", "origins": "https://x.example"},
     {"agent_id", "kind", "origins"}),
    ("POST", "/api/tokens", {"name": "", "expires_in_days": 0}, {"name", "expires_in_days"}),
    ("POST", "/api/organisations", {"kind": "reseller"}, {"name", "kind"}),
    ("POST", "/api/organisations", ["a list"], {"body"}),
]


@pytest.mark.parametrize(("method", "path", "body", "fields"), CASES)
async def test_invalid_bodies_name_their_fields(
    make_user: MakeUser, method: str, path: str, body: Any, fields: set[str],
) -> None:
    user = await make_user()
    response = await user.client.request(method, path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert set(error["fields"]) == fields
    assert (await user.client.get("/api/orders")).json()["items"] == []


async def test_malformed_and_mistyped_bodies(make_user: MakeUser) -> None:
    user = await make_user()
    broken = await user.client.post("/api/orders", content=b"{not json",
                                    headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    form = await user.client.post("/api/orders", content=b"a=b",
                                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert "application/json" in form.json()["error"]["message"]
    huge = await user.client.post("/api/organisations", content=b" " * (3 * 1024 * 1024),
                                  headers={"content-type": "application/json"})
    assert huge.status_code == 413


async def test_a_signed_webhook_with_a_bad_body_is_refused_by_field(
    api: httpx.AsyncClient,
) -> None:
    body = orjson.dumps({"id": "", "type": "order.cancelled", "order_id": "x"})
    response = await api.post("/api/webhooks/order-approved", content=body, headers={
        "content-type": "application/json", "sitekit-signature": sign(WEBHOOK_SECRET, body)})
    assert response.status_code == 422
    assert set(response.json()["error"]["fields"]) == {"id", "type", "order_id"}
