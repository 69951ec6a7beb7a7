"""The CMP in process on a fresh database and an emptied Redis, and users to call it as."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from cmp import identity
from cmp.app import build_app
from cmp.config import CmpConfig
from cmp.registry import AgentInstance, save_instance

SERVICE_TOKEN = "test-service-token"
WEBHOOK_SECRET = "test-webhook-secret"


@dataclass(frozen=True)
class RuntimeTarget:
    url: str
    token: str


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "provisions: the CMP deploys to the session stack's runtime"
    )


@pytest.fixture
def runtime_target(request: pytest.FixtureRequest) -> RuntimeTarget:
    """Where provisioning deploys: the session stack's runtime for tests marked `provisions`
    (started again if a fault test stopped it), otherwise an address nothing listens on."""
    if request.node.get_closest_marker("provisions") is None:
        return RuntimeTarget("http://127.0.0.1:9", "no-runtime")
    from devstack.stack import Stack

    stack: Stack = request.getfixturevalue("stack")
    if not stack.process("runtime").running:
        stack.start_process("runtime")
    return RuntimeTarget(stack.runtime_url, stack.secrets.runtime_token)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def make_agent(conn: asyncpg.Connection, tenant_id: str | None = None) -> AgentInstance:
    return await save_instance(conn, AgentInstance(
        agent_id=str(uuid.uuid4()), tenant_id=tenant_id or str(uuid.uuid4()), name="Helper",
        runtime_url="http://127.0.0.1:9/", flow_id="demo", flow_version=1,
        allowed_origins=("https://shop.example",),
    ))


@pytest.fixture
def cmp_overrides() -> dict[str, Any]:
    """Settings a test changes: `@pytest.mark.parametrize("cmp_overrides", [{...}])`."""
    return {}


@pytest.fixture
def cmp_config(
    database_url: str, redis_url: str, runtime_target: RuntimeTarget, cmp_overrides: dict[str, Any]
) -> CmpConfig:
    settings: dict[str, Any] = {
        "database_url": database_url, "redis_url": redis_url, "issuer": "sitekit-test",
        "service_token": SERVICE_TOKEN, "webhook_secret": WEBHOOK_SECRET,
        "provision_backoff_s": 0.05, "runtime_url": runtime_target.url,
        "runtime_token": runtime_target.token,
    }
    return CmpConfig(**{**settings, **cmp_overrides})


@pytest.fixture
async def cmp_app(cmp_config: CmpConfig) -> AsyncIterator[Starlette]:
    app = build_app(cmp_config)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def api(cmp_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An anonymous client; `as_user` gives clients that carry a user's token."""
    transport = httpx.ASGITransport(app=cmp_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cmp.test") as client:
        yield client


@dataclass
class User:
    user_id: uuid.UUID
    email: str
    token: str
    org_id: uuid.UUID
    client: httpx.AsyncClient

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


MakeUser = Callable[..., Awaitable[User]]


@pytest.fixture
async def make_user(
    cmp_app: Starlette, cmp_config: CmpConfig
) -> AsyncIterator[MakeUser]:
    """A user owning a fresh organisation (or holding `role` in `org_id`), with a client."""
    clients: list[httpx.AsyncClient] = []
    conn = await asyncpg.connect(cmp_config.database_url)

    async def make(
        kind: str = "customer", *, org_id: uuid.UUID | None = None, role: str = "owner",
        staff: bool = False,
    ) -> User:
        email = f"user-{uuid.uuid4().hex[:10]}@example.test"
        user_id = await identity.create_user(conn, email=email, is_staff=staff)
        if org_id is None:
            org_id = await identity.create_organisation(
                conn, name=f"Org of {email}", kind=kind, owner=user_id
            )
        else:
            await identity.add_member(conn, org_id, user_id, role)
        issued = await identity.create_token(conn, user_id)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cmp_app), base_url="http://cmp.test",
            headers={"Authorization": f"Bearer {issued.token}"},
        )
        clients.append(client)
        return User(user_id, email, issued.token, org_id, client)

    yield make
    for client in clients:
        await client.aclose()
    await conn.close()


@dataclass
class PublishedAgent:
    provider: User
    provider_agent_id: uuid.UUID


@pytest.fixture
async def published_agent(make_user: MakeUser, cmp_config: CmpConfig) -> PublishedAgent:
    """A seller with the demo flow published as version 1 (written directly: the seller's own
    endpoints are tested in test_provider_agents)."""
    from cmp.ids import uuid7
    from devstack.seed import DEMO_FLOW

    provider = await make_user("provider")
    agent_id = uuid7()
    conn = await asyncpg.connect(cmp_config.database_url)
    try:
        await conn.execute(
            "INSERT INTO provider_agents (provider_agent_id, org_id, name, description,"
            " published, price, limits) VALUES ($1, $2, 'Demo helper', 'Answers questions',"
            " true, $3, $4)", agent_id, provider.org_id,
            '{"amount": 1900, "currency": "EUR"}',
            '{"tenant": {"rate": 50, "burst": 100}, "key": {"rate": 10, "burst": 20}}',
        )
        await conn.execute(
            "INSERT INTO provider_agent_versions (provider_agent_id, version, flow)"
            " VALUES ($1, 1, $2)", agent_id, DEMO_FLOW.read_text(),
        )
    finally:
        await conn.close()
    return PublishedAgent(provider, agent_id)
