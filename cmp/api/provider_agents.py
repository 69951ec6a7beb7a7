"""`/api/provider-agents`: a seller's agents, their immutable flow versions, publishing, price
and plan limits. Members of the seller's organisation read; admins and owners write."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.json_schema import SkipJsonSchema

from cmp.api.fields import Body, Name, Query, Text
from cmp.api.operation import Call, Operation, Reply
from cmp.api.pages import FIRST_ID, Page, bigint
from cmp.errors import Conflict, Forbidden, InvalidInput, NotFound
from cmp.flows import ValidatedFlow, validate_flow
from cmp.ids import uuid7
from cmp.registry import DEFAULT_LIMITS

SELLER_KINDS = ("provider", "both")


class StripePrice(Body):
    stripe_price_id: Annotated[str, StringConstraints(pattern=r"^price_[A-Za-z0-9]{1,250}$")] = (
        Field(description="a Stripe Price id (price_...)"))


class AmountPrice(Body):
    amount: int = Field(gt=0, le=100_000_000, description="in the currency's minor units")
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = Field(
        description="ISO 4217 code, upper case (EUR, USD)")


Price = StripePrice | AmountPrice


class BucketLimit(Body):
    rate: float = Field(ge=0.001, le=10_000, description="tokens added per second")
    burst: int = Field(ge=1, le=100_000, description="the bucket's capacity")


class PlanLimits(Body):
    """The gateway's two token buckets for each buyer of this agent: the tenant's, shared by
    all its keys, and each key's, which fits inside it."""

    tenant: BucketLimit
    key: BucketLimit

    @model_validator(mode="after")
    def key_fits_in_tenant(self) -> PlanLimits:
        if self.key.rate > self.tenant.rate or self.key.burst > self.tenant.burst:
            raise ValueError("a key's rate and burst may not exceed the tenant's")
        return self


def _default_limits() -> PlanLimits:
    return PlanLimits.model_validate(DEFAULT_LIMITS.to_json())


class NewProviderAgent(Body):
    org_id: uuid.UUID = Field(description="the selling organisation (kind provider or both)")
    name: Name
    description: Text = ""
    flow: dict[str, Any] = Field(description="the flow as Langflow exports it (JSON object)")
    price: Price
    limits: PlanLimits = Field(default_factory=_default_limits)


def _without_null_defaults(schema: dict[str, Any]) -> None:
    for field in schema.get("properties", {}).values():
        if field.get("default", ...) is None:
            del field["default"]


class ProviderAgentChange(Body):
    """Absent fields keep their value; null is refused, and the schema offers none."""

    model_config = ConfigDict(json_schema_extra=_without_null_defaults)

    name: Name | SkipJsonSchema[None] = None
    description: Text | SkipJsonSchema[None] = None
    price: Price | SkipJsonSchema[None] = None
    limits: PlanLimits | SkipJsonSchema[None] = None

    @model_validator(mode="before")
    @classmethod
    def no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = sorted(name for name, value in data.items() if value is None)
            if nulls:
                raise ValueError(f"{', '.join(nulls)} may not be null; leave a field out to "
                                 "keep its value")
        return data


class NewVersion(Body):
    flow: dict[str, Any] = Field(description="the flow as Langflow exports it (JSON object)")


class ProviderAgentFilter(Query):
    org_id: uuid.UUID | None = None
    published: bool | None = None


class ProviderAgent(BaseModel):
    provider_agent_id: uuid.UUID
    org_id: uuid.UUID
    name: str
    description: str
    published: bool
    price: Price
    limits: PlanLimits
    current_version: int
    created_at: dt.datetime
    updated_at: dt.datetime


class VersionSummary(BaseModel):
    provider_agent_id: uuid.UUID
    version: int
    stripped_secrets: list[str] = Field(
        description="node.field of each credential field whose pasted value was removed")
    warnings: list[str]
    created_by: uuid.UUID | None
    created_at: dt.datetime


class Version(VersionSummary):
    flow: dict[str, Any]


class CreatedProviderAgent(ProviderAgent):
    version: VersionSummary


AGENT_COLUMNS = ("provider_agent_id, org_id, name, description, published, price, limits,"
                 " current_version, created_at, updated_at")
_VERSION_COLUMNS = "provider_agent_id, version, stripped_secrets, warnings, created_by, created_at"


def agent_fields(row: asyncpg.Record) -> dict[str, Any]:
    return {**dict(row), "price": orjson.loads(row["price"]),
            "limits": orjson.loads(row["limits"])}


def _json(model: BaseModel) -> str:
    return model.model_dump_json()


async def _require_seller(call: Call, org_id: uuid.UUID) -> None:
    call.caller.require(org_id, "admin", "organisation")
    kind = await call.conn.fetchval("SELECT kind FROM organisations WHERE org_id = $1", org_id)
    if kind not in SELLER_KINDS:
        raise Forbidden(f"organisation {org_id} is a {kind} organisation; only provider "
                        "organisations (kind provider or both) sell agents")


async def _agent_row(
    call: Call, agent_id: uuid.UUID, at_least: str, *, lock: bool = False
) -> asyncpg.Record:
    """The agent if it belongs to one of the caller's organisations (else 404), and the caller
    holds `at_least` that role there (else 403)."""
    row = await call.conn.fetchrow(
        f"SELECT {AGENT_COLUMNS} FROM provider_agents"
        " WHERE provider_agent_id = $1 AND org_id = ANY($2::uuid[])"
        + (" FOR UPDATE" if lock else ""),
        agent_id, call.caller.org_ids("member"),
    )
    if row is None:
        raise NotFound(f"no provider agent {agent_id}")
    call.caller.require(row["org_id"], at_least, "provider agent")
    return row


async def _insert_version(
    call: Call, agent_id: uuid.UUID, version: int, checked: ValidatedFlow
) -> VersionSummary:
    row = await call.conn.fetchrow(
        "INSERT INTO provider_agent_versions (provider_agent_id, version, flow, stripped_secrets,"
        f" warnings, created_by) VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_VERSION_COLUMNS}",
        agent_id, version, orjson.dumps(checked.flow).decode(), checked.stripped_secrets,
        checked.warnings, call.caller.user_id,
    )
    return VersionSummary(**dict(row))


async def create_provider_agent(call: Call) -> Reply:
    body: NewProviderAgent = call.body
    await _require_seller(call, body.org_id)
    checked = await validate_flow(body.flow)
    agent_id = uuid7()
    async with call.conn.transaction():
        row = await call.conn.fetchrow(
            "INSERT INTO provider_agents (provider_agent_id, org_id, name, description, price,"
            f" limits) VALUES ($1, $2, $3, $4, $5, $6) RETURNING {AGENT_COLUMNS}",
            agent_id, body.org_id, body.name, body.description, _json(body.price),
            _json(body.limits),
        )
        version = await _insert_version(call, agent_id, 1, checked)
        await call.audit("provider_agent.create", "provider_agent", agent_id, body.org_id,
                         {"version": 1, "stripped_secrets": checked.stripped_secrets})
    return Reply(CreatedProviderAgent(**agent_fields(row), version=version), 201)


async def list_provider_agents(call: Call) -> Page[ProviderAgent]:
    page = call.page
    assert page is not None
    wanted: ProviderAgentFilter = call.query
    # One index range (org_id, provider_agent_id) per organisation, merged, as in every list.
    rows = await call.conn.fetch(
        "SELECT a.* FROM unnest($1::uuid[]) AS t(org_id) CROSS JOIN LATERAL ("
        f" SELECT {AGENT_COLUMNS} FROM provider_agents WHERE org_id = t.org_id"
        "  AND ($2::boolean IS NULL OR published = $2) AND provider_agent_id > $3"
        "  ORDER BY provider_agent_id LIMIT $4) a ORDER BY a.provider_agent_id LIMIT $4",
        call.caller.org_ids(only=wanted.org_id),
        wanted.published, page.after[0] if page.after else FIRST_ID, page.limit + 1,
    )
    agents = [ProviderAgent(**agent_fields(r)) for r in rows]
    return page.page(agents, lambda a: [a.provider_agent_id])


async def get_provider_agent(call: Call) -> ProviderAgent:
    agent_id = call.path_id("provider_agent_id", "provider agent")
    return ProviderAgent(**agent_fields(await _agent_row(call, agent_id, "member")))


async def update_provider_agent(call: Call) -> ProviderAgent:
    agent_id = call.path_id("provider_agent_id", "provider agent")
    body: ProviderAgentChange = call.body
    changed = sorted(body.model_fields_set)
    if not changed:
        raise InvalidInput("send at least one of name, description, price, limits",
                           fields={"body": "nothing to change"})
    sent = {name: getattr(body, name) for name in changed}
    async with call.conn.transaction():
        current = await _agent_row(call, agent_id, "admin", lock=True)
        row = await call.conn.fetchrow(
            "UPDATE provider_agents SET name = coalesce($2, name),"
            " description = coalesce($3, description), price = coalesce($4::jsonb, price),"
            " limits = coalesce($5::jsonb, limits), updated_at = now()"
            f" WHERE provider_agent_id = $1 RETURNING {AGENT_COLUMNS}",
            agent_id, sent.get("name"), sent.get("description"),
            _json(sent["price"]) if "price" in sent else None,
            _json(sent["limits"]) if "limits" in sent else None,
        )
        await call.audit("provider_agent.update", "provider_agent", agent_id,
                         current["org_id"], {"fields": changed})
    return ProviderAgent(**agent_fields(row))


async def create_version(call: Call) -> Reply:
    agent_id = call.path_id("provider_agent_id", "provider agent")
    body: NewVersion = call.body
    await _agent_row(call, agent_id, "admin")  # refuse before the costly validation
    checked = await validate_flow(body.flow)
    async with call.conn.transaction():
        current = await _agent_row(call, agent_id, "admin", lock=True)
        number = current["current_version"] + 1
        version = await _insert_version(call, agent_id, number, checked)
        await call.conn.execute(
            "UPDATE provider_agents SET current_version = $2, updated_at = now()"
            " WHERE provider_agent_id = $1", agent_id, number,
        )
        await call.audit("provider_agent.version.create", "provider_agent", agent_id,
                         current["org_id"],
                         {"version": number, "stripped_secrets": checked.stripped_secrets})
    return Reply(version, 201)


async def list_versions(call: Call) -> Page[VersionSummary]:
    agent_id = call.path_id("provider_agent_id", "provider agent")
    page = call.page
    assert page is not None
    await _agent_row(call, agent_id, "member")
    rows = await call.conn.fetch(
        f"SELECT {_VERSION_COLUMNS} FROM provider_agent_versions WHERE provider_agent_id = $1"
        " AND ($2::integer IS NULL OR version > $2) ORDER BY version LIMIT $3",
        agent_id, page.after[0] if page.after else None, page.limit + 1,
    )
    return page.page([VersionSummary(**dict(r)) for r in rows], lambda v: [v.version])


async def get_version(call: Call) -> Version:
    agent_id = call.path_id("provider_agent_id", "provider agent")
    raw = call.request.path_params["version"]
    await _agent_row(call, agent_id, "member")
    number = int(raw) if raw.isdigit() and len(raw) < 10 else None
    row = None if number is None else await call.conn.fetchrow(
        f"SELECT {_VERSION_COLUMNS}, flow FROM provider_agent_versions"
        " WHERE provider_agent_id = $1 AND version = $2", agent_id, number,
    )
    if row is None:
        raise NotFound(f"no version {raw!r} of provider agent {agent_id}")
    return Version(**{**dict(row), "flow": orjson.loads(row["flow"])})


async def _set_published(call: Call, published: bool) -> ProviderAgent:
    agent_id = call.path_id("provider_agent_id", "provider agent")
    async with call.conn.transaction():
        row = await _agent_row(call, agent_id, "admin", lock=True)
        if row["published"] == published:
            return ProviderAgent(**agent_fields(row))  # already so: nothing to write
        number = row["current_version"]
        if published:
            await _check_publishable(call, agent_id, number)
        row = await call.conn.fetchrow(
            "UPDATE provider_agents SET published = $2, updated_at = now()"
            f" WHERE provider_agent_id = $1 RETURNING {AGENT_COLUMNS}", agent_id, published,
        )
        action = "provider_agent.publish" if published else "provider_agent.unpublish"
        await call.audit(action, "provider_agent", agent_id, row["org_id"], {"version": number})
    return ProviderAgent(**agent_fields(row))


async def _check_publishable(call: Call, agent_id: uuid.UUID, number: int) -> None:
    """The installed components may have changed since the version was stored: check again."""
    flow = await call.conn.fetchval(
        "SELECT flow FROM provider_agent_versions WHERE provider_agent_id = $1 AND version = $2",
        agent_id, number,
    )
    if flow is None:
        raise Conflict(f"provider agent {agent_id} has no version {number} to publish")
    try:
        await validate_flow(orjson.loads(flow))
    except InvalidInput as exc:
        problem = (exc.fields or {}).get("flow", exc.message)
        raise Conflict(f"version {number} cannot be published: {problem}; paste a new version",
                       fields={"current_version": problem}) from None


async def publish_provider_agent(call: Call) -> ProviderAgent:
    return await _set_published(call, True)


async def unpublish_provider_agent(call: Call) -> ProviderAgent:
    return await _set_published(call, False)


_ONE = "/api/provider-agents/{provider_agent_id}"
_TAG = "provider-agents"

OPERATIONS = [
    Operation("POST", "/api/provider-agents",
              "Create an agent from a pasted Langflow flow (admin of a provider organisation);"
              " pasted secrets are stripped and reported", create_provider_agent, _TAG,
              body=NewProviderAgent, response=CreatedProviderAgent, status=201,
              errors=(403, 404)),
    Operation("GET", "/api/provider-agents", "Your organisations' agents",
              list_provider_agents, _TAG, query=ProviderAgentFilter, response=ProviderAgent,
              paged=True),
    Operation("GET", _ONE, "One of your organisations' agents", get_provider_agent, _TAG,
              response=ProviderAgent),
    Operation("PATCH", _ONE, "Change name, description, price or limits (admin)",
              update_provider_agent, _TAG, body=ProviderAgentChange, response=ProviderAgent,
              errors=(403,)),
    Operation("POST", f"{_ONE}/versions",
              "Paste a new flow: a new immutable version becomes current (admin)",
              create_version, _TAG, body=NewVersion, response=VersionSummary, status=201,
              errors=(403,)),
    Operation("GET", f"{_ONE}/versions", "The agent's versions, oldest first", list_versions,
              _TAG, response=VersionSummary, paged=True, cursor=(bigint,)),
    Operation("GET", f"{_ONE}/versions/{{version}}", "One version, with its flow",
              get_version, _TAG, response=Version),
    Operation("POST", f"{_ONE}/publish",
              "List the agent in the marketplace (admin; its current version is checked again)",
              publish_provider_agent, _TAG, response=ProviderAgent, errors=(403, 409)),
    Operation("POST", f"{_ONE}/unpublish", "Take the agent off the marketplace (admin)",
              unpublish_provider_agent, _TAG, response=ProviderAgent, errors=(403,)),
]
