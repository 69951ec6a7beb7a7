"""Users, organisations, memberships, tokens and the audit log through the API."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from tests.cmp.conftest import MakeUser


async def test_tokens_authenticate_until_revoked(
    api: httpx.AsyncClient, make_user: MakeUser
) -> None:
    user = await make_user()
    assert (await api.get("/api/me")).status_code == 401
    bad = await api.get("/api/me", headers={"Authorization": "Bearer skt_madeup"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    created = await user.client.post("/api/tokens", json={"name": "ci", "expires_in_days": 30})
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    second = {"Authorization": f"Bearer {token}"}
    me = (await api.get("/api/me", headers=second)).json()
    assert me["email"] == user.email and me["organisations"][0]["role"] == "owner"
    listed = (await user.client.get("/api/tokens")).json()["items"]
    assert token not in str(listed) and {t["name"] for t in listed} == {"", "ci"}
    revoked = await user.client.delete(f"/api/tokens/{created.json()['token_id']}")
    assert revoked.status_code == 204
    assert (await api.get("/api/me", headers=second)).status_code == 401
    assert (await user.client.get("/api/me")).status_code == 200


async def test_organisations_and_members(api: httpx.AsyncClient, make_user: MakeUser) -> None:
    owner, outsider = await make_user(), await make_user()
    made = await owner.client.post("/api/organisations",
                                   json={"name": "Café « Ünïcode » '); --", "kind": "both"})
    assert made.status_code == 201, made.text
    org = made.json()
    assert org["name"] == "Café « Ünïcode » '); --" and org["role"] == "owner"
    assert (await outsider.client.get(f"/api/organisations/{org['org_id']}")).status_code == 404

    added = await owner.client.post(f"/api/organisations/{org['org_id']}/members",
                                    json={"email": outsider.email.upper(), "role": "admin"})
    assert added.status_code == 201, added.text
    seen = await outsider.client.get(f"/api/organisations/{org['org_id']}")
    assert seen.json()["role"] == "admin"
    # An admin may add members but not owners, nor remove anyone.
    owner_grant = await outsider.client.post(f"/api/organisations/{org['org_id']}/members",
                                             json={"email": owner.email, "role": "owner"})
    assert owner_grant.status_code == 403
    members = (await owner.client.get(f"/api/organisations/{org['org_id']}/members")).json()
    assert {m["email"] for m in members["items"]} == {owner.email, outsider.email}
    last_owner = await owner.client.delete(
        f"/api/organisations/{org['org_id']}/members/{owner.user_id}")
    assert last_owner.status_code == 403 and "one owner" in last_owner.json()["error"]["message"]
    removed = await owner.client.delete(
        f"/api/organisations/{org['org_id']}/members/{outsider.user_id}")
    assert removed.status_code == 204
    assert (await outsider.client.get(f"/api/organisations/{org['org_id']}")).status_code == 404
    unknown = await owner.client.post(f"/api/organisations/{org['org_id']}/members",
                                      json={"email": "nobody@example.test"})
    assert unknown.status_code == 404


async def test_only_staff_create_users(api: httpx.AsyncClient, make_user: MakeUser) -> None:
    staff, user = await make_user(staff=True), await make_user()
    refused = await user.client.post("/api/users", json={"email": "new@example.test"})
    assert refused.status_code == 403
    created = await staff.client.post("/api/users", json={"email": "new@example.test",
                                                           "name": "Zoë"})
    assert created.status_code == 201, created.text
    token = created.json()["token"]["token"]
    me = await api.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["name"] == "Zoë" and me.json()["organisations"] == []
    taken = await staff.client.post("/api/users", json={"email": "NEW@example.test"})
    assert taken.status_code == 409
    invalid = await staff.client.post("/api/users", json={"email": "not-an-email", "x": 1})
    assert invalid.status_code == 422
    assert set(invalid.json()["error"]["fields"]) == {"email", "x"}


async def test_audit_log_is_for_owners_of_their_organisations_and_staff(
    make_user: MakeUser,
) -> None:
    owner, other, staff = await make_user(), await make_user(), await make_user(staff=True)
    member = await make_user(org_id=owner.org_id, role="member")
    made = (await owner.client.post("/api/organisations",
                                    json={"name": "Audited", "kind": "customer"})).json()
    await other.client.post("/api/organisations", json={"name": "Elsewhere", "kind": "customer"})
    mine = (await owner.client.get("/api/audit-log")).json()["items"]
    assert [(e["action"], e["object_id"]) for e in mine] == [
        ("organisation.create", made["org_id"])]
    assert mine[0]["actor_user_id"] == str(owner.user_id)
    assert (await member.client.get("/api/audit-log")).json()["items"] == []
    everything = (await staff.client.get("/api/audit-log?action=organisation.create")).json()
    assert {e["details"]["name"] for e in everything["items"]} == {"Audited", "Elsewhere"}


def test_the_cli_creates_a_user_with_an_organisation_and_token(database_url: str) -> None:
    env = {**os.environ, "CMP_DATABASE_URL": database_url, "CMP_SERVICE_TOKEN": "x"}
    done = subprocess.run(
        [sys.executable, "-m", "cmp", "create-user", "--email", "cli@example.test",
         "--org", "CLI shop", "--kind", "provider"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "token (shown once): skt_" in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "cmp", "create-user", "--email", "CLI@example.test"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 1 and "exists" in again.stderr


async def test_the_document_and_unknown_routes_answer_without_a_user(
    api: httpx.AsyncClient,
) -> None:
    """Also the shortest life an app can have: it must still stop at once (its background
    loops end on shutdown even when a client library swallowed their cancellation)."""
    document = (await api.get("/openapi.json")).json()
    assert document["openapi"] == "3.1.0" and "/api/customer-agent-configs" in document["paths"]
    missing = await api.get("/api/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await api.put("/api/me")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
