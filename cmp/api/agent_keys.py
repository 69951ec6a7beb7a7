"""`/api/agent-api-keys`: a buyer's secret and publishable keys. The token is shown once;
revoking reaches every gateway within a second; rotating issues the replacement and revokes
the old key in one step."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from cmp.agent_configs import load_config
from cmp.api.fields import Body, Query
from cmp.api.operation import Call, Operation, Reply
from cmp.api.pages import FIRST_ID, Page
from cmp.apikeys import (
    KEY_COLUMNS,
    ApiKey,
    issue_key,
    key_from_row,
    normalise_origins,
    revoke_key,
)
from cmp.errors import Conflict, InvalidInput, NotFound

KeyKind = Literal["secret", "publishable"]
OriginText = Annotated[str, StringConstraints(min_length=1, max_length=300)]


class AgentKey(BaseModel):
    key_id: uuid.UUID
    agent_id: uuid.UUID
    kind: KeyKind
    masked: str = Field(description="the last characters of the token, for recognising it")
    origins: list[str]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


class IssuedAgentKey(AgentKey):
    token: str = Field(description="shown once; the CMP keeps no copy")


class NewAgentKey(Body):
    agent_id: uuid.UUID
    kind: KeyKind
    origins: list[OriginText] = Field(default_factory=list, max_length=20)
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class KeyFilter(Query):
    agent_id: uuid.UUID | None = None
    kind: KeyKind | None = None
    revoked: bool | None = None


def _out(key: ApiKey) -> AgentKey:
    return AgentKey(
        key_id=uuid.UUID(key.key_id), agent_id=uuid.UUID(key.agent_id), kind=key.kind,  # type: ignore[arg-type]
        masked=f"…{key.prefix}", origins=list(key.origins), created_at=key.created_at,
        expires_at=key.expires_at, revoked_at=key.revoked_at,
    )


def _issued(key: ApiKey, token: str) -> IssuedAgentKey:
    return IssuedAgentKey(**_out(key).model_dump(), token=token)


async def _issue(
    call: Call, agent_id: uuid.UUID, kind: str, origins: list[str], expires_in_days: int | None,
) -> IssuedAgentKey:
    """Inside the caller's transaction; the agent must be the caller's and provisioned."""
    config = await load_config(call.conn, agent_id, call.caller.org_ids(), for_update=True)
    call.caller.require(config.row["tenant_id"], "admin", "agent config")
    if config.row["provisioning"] != "active":
        raise Conflict(f"agent {agent_id} is {config.status}; keys come once it is active")
    clean = normalise_origins(origins, "origins")
    allowed = set(config.row["allowed_origins"])
    outside = [origin for origin in clean if origin not in allowed]
    if outside:
        raise InvalidInput(
            f"{', '.join(outside)} is not among the agent's allowed origins; add it to the "
            "agent config first, or the gateway would refuse every call",
            fields={"origins": "must be among the agent's allowed_origins"},
        )
    issued = await issue_key(
        call.conn, issuer=call.services.config.issuer, tenant_id=str(config.row["tenant_id"]),
        agent_id=str(agent_id), kind=kind, origins=clean,
        expires_in=dt.timedelta(days=expires_in_days) if expires_in_days else None,
    )
    await call.audit("api_key.create", "api_key", issued.key.key_id, config.row["tenant_id"],
                     {"agent_id": str(agent_id), "kind": kind, "origins": clean})
    return _issued(issued.key, issued.token)


async def create_key(call: Call) -> Reply:
    body: NewAgentKey = call.body
    async with call.conn.transaction():
        issued = await _issue(call, body.agent_id, body.kind, body.origins, body.expires_in_days)
    return Reply(issued, 201)


async def list_keys(call: Call) -> Page[AgentKey]:
    page, wanted = call.page, call.query
    assert page is not None and isinstance(wanted, KeyFilter)
    rows = await call.conn.fetch(
        "SELECT k.* FROM unnest($1::uuid[]) AS t(tenant_id) CROSS JOIN LATERAL ("
        f" SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = t.tenant_id AND key_id > $2"
        "  AND ($3::uuid IS NULL OR agent_id = $3) AND ($4::text IS NULL OR kind = $4)"
        "  AND ($5::boolean IS NULL OR (revoked_at IS NOT NULL) = $5)"
        "  ORDER BY api_keys.key_id LIMIT $6) k ORDER BY k.key_id LIMIT $6",
        call.caller.org_ids(), page.after[0] if page.after else FIRST_ID,
        wanted.agent_id, wanted.kind, wanted.revoked, page.limit + 1,
    )
    return page.page([_out(key_from_row(r)) for r in rows], lambda k: [k.key_id])


async def _load(call: Call, key_id: uuid.UUID) -> ApiKey:
    row = await call.conn.fetchrow(
        f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1 AND tenant_id = ANY($2)",
        key_id, call.caller.org_ids(),
    )
    if row is None:
        raise NotFound(f"no API key {key_id}")
    return key_from_row(row)


async def get_key(call: Call) -> AgentKey:
    return _out(await _load(call, call.path_id("key_id", "API key")))


async def revoke(call: Call) -> AgentKey:
    key_id = call.path_id("key_id", "API key")
    async with call.conn.transaction():
        key = await _load(call, key_id)
        call.caller.require(uuid.UUID(key.tenant_id), "admin", "API key")
        revoked = await revoke_key(call.conn, call.services.redis, tenant_id=key.tenant_id,
                                   key_id=str(key_id))
        await call.audit("api_key.revoke", "api_key", key_id, uuid.UUID(key.tenant_id))
    return _out(revoked)


async def rotate(call: Call) -> Reply:
    key_id = call.path_id("key_id", "API key")
    async with call.conn.transaction():
        old = await _load(call, key_id)
        call.caller.require(uuid.UUID(old.tenant_id), "admin", "API key")
        if old.revoked_at is not None:
            raise Conflict(f"key {key_id} is revoked; create a new key instead")
        days = None
        if old.expires_at is not None:
            days = max(1, (old.expires_at - old.created_at).days)
        issued = await _issue(call, uuid.UUID(old.agent_id), old.kind, list(old.origins), days)
        await revoke_key(call.conn, call.services.redis, tenant_id=old.tenant_id,
                         key_id=str(key_id))
        await call.audit("api_key.rotate", "api_key", key_id, uuid.UUID(old.tenant_id),
                         {"replaced_by": str(issued.key_id)})
    return Reply(issued, 201)


OPERATIONS = [
    Operation("POST", "/api/agent-api-keys",
              "Create a secret or publishable key (origins among the agent's allowed origins)",
              create_key, "agent-api-keys", body=NewAgentKey, response=IssuedAgentKey,
              status=201, errors=(403, 404, 409)),
    Operation("GET", "/api/agent-api-keys", "Your keys, masked", list_keys, "agent-api-keys",
              query=KeyFilter, response=AgentKey, paged=True),
    Operation("GET", "/api/agent-api-keys/{key_id}", "One key, masked", get_key,
              "agent-api-keys", response=AgentKey),
    Operation("POST", "/api/agent-api-keys/{key_id}/revoke",
              "Revoke: gateways refuse it within a second", revoke, "agent-api-keys",
              response=AgentKey, errors=(403,)),
    Operation("POST", "/api/agent-api-keys/{key_id}/rotate",
              "Issue a replacement with the same type and origins, and revoke this one", rotate,
              "agent-api-keys", response=IssuedAgentKey, status=201, errors=(403, 409)),
]
