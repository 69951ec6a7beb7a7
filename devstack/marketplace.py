"""A client of the CMP's REST API that plays seller, buyer and the marketplace's webhook: the
demo seeding, the CMP benchmark and the end-to-end journeys all go through it."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import TracebackType
from typing import Any

import asyncpg
import httpx
import orjson

from cmp import identity
from cmp.api.webhook_signature import HEADER, sign


class MarketplaceError(Exception):
    """The CMP answered something a journey step cannot go on from; the message says what."""


async def create_owner(database_url: str, email: str, org_name: str, kind: str) -> dict[str, str]:
    """A user owning a new organisation, with a token: what `python -m cmp create-user --org`
    does, for scripts that already hold the database."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            user_id = await identity.create_user(conn, email=email)
            org_id = await identity.create_organisation(
                conn, name=org_name, kind=kind, owner=user_id
            )
            issued = await identity.create_token(conn, user_id, name="demo")
    finally:
        await conn.close()
    return {"user_id": str(user_id), "org_id": str(org_id), "email": email,
            "cmp_token": issued.token}


class CmpClient:
    """One user's view of the CMP."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    async def __aenter__(self) -> CmpClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code != expect:
            raise MarketplaceError(
                f"{method} {path}: {response.status_code} {response.text[:500]}"
            )
        return response.json() if response.content else None

    async def publish_agent(self, org_id: str, name: str, flow: dict[str, Any],
                            **fields: Any) -> dict[str, Any]:
        agent: dict[str, Any] = await self.call("POST", "/api/provider-agents", 201, json={
            "org_id": org_id, "name": name, "flow": flow,
            "price": {"amount": 1900, "currency": "EUR"}, **fields,
        })
        await self.call("POST", f"/api/provider-agents/{agent['provider_agent_id']}/publish")
        return agent

    async def order(self, org_id: str, provider_agent_id: str) -> dict[str, Any]:
        placed: dict[str, Any] = await self.call("POST", "/api/orders", 201, json={
            "org_id": org_id, "provider_agent_id": provider_agent_id})
        return placed

    async def wait_active(self, agent_id: str, within_s: float = 120.0,
                          poll_s: float = 0.05) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while True:
            config: dict[str, Any] = await self.call(
                "GET", f"/api/customer-agent-configs/{agent_id}")
            if config["status"] == "active":
                return config
            if config["status"] == "failed" or time.monotonic() > deadline:
                raise MarketplaceError(
                    f"agent {agent_id} is {config['status']}: {config['failure_reason']}")
            await asyncio.sleep(poll_s)

    async def configure(self, agent_id: str, **changes: Any) -> dict[str, Any]:
        config: dict[str, Any] = await self.call(
            "PATCH", f"/api/customer-agent-configs/{agent_id}", json=changes)
        return config

    async def create_key(self, agent_id: str, kind: str,
                         origins: list[str] | None = None) -> dict[str, Any]:
        key: dict[str, Any] = await self.call("POST", "/api/agent-api-keys", 201, json={
            "agent_id": agent_id, "kind": kind, "origins": origins or []})
        return key


async def approve_order(cmp_url: str, webhook_secret: str, order_id: str) -> dict[str, Any]:
    """What the marketplace does once the buyer has paid: the signed order-approved webhook."""
    body = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "order.approved",
                         "order_id": order_id})
    async with httpx.AsyncClient(base_url=cmp_url, timeout=30) as http:
        response = await http.post("/api/webhooks/order-approved", content=body, headers={
            "content-type": "application/json", HEADER: sign(webhook_secret, body)})
    if response.status_code != 200:
        raise MarketplaceError(f"order-approved webhook: {response.status_code} {response.text}")
    approved: dict[str, Any] = response.json()
    return approved
