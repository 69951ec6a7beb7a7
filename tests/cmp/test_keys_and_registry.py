"""The CMP's keys and registry against a real Postgres and Redis."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from cmp import wire
from cmp.apikeys import issue_key, list_keys, normalise_origin, revoke_key, sync_revocations
from cmp.errors import InvalidInput, NotFound
from cmp.migrate import MigrationError, migrate
from cmp.registry import AgentInstance, load_instance, publish_entry, republish_all, save_instance
from cmp.signing import active_signing_key, jwks, retire_signing_key, rotate_signing_key
from tests.cmp.conftest import make_agent

ISSUER = "sitekit-test"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def next_message(pubsub: aioredis.client.PubSub) -> str | None:
    for _ in range(20):
        message = await pubsub.get_message(timeout=0.2)
        if message is not None and message["type"] == "message":
            return str(message["data"].decode())
    return None


def verify(token: str, keyset: dict[str, object]) -> dict[str, object]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(keyset)[kid].key
    return jwt.decode(token, key, algorithms=["EdDSA"], audience="gateway", issuer=ISSUER)


async def test_issued_key_verifies_against_the_jwks_with_its_claims(
    conn: asyncpg.Connection,
) -> None:
    agent = await make_agent(conn)
    issued = await issue_key(conn, issuer=ISSUER, tenant_id=agent.tenant_id,
                             agent_id=agent.agent_id, kind="publishable",
                             origins=["https://Shop.Example:443/"])
    claims = verify(issued.token, await jwks(conn))
    assert claims["tid"] == agent.tenant_id
    assert claims["aid"] == agent.agent_id
    assert claims["kty"] == "publishable"
    assert claims["jti"] == issued.key.key_id
    assert claims["origins"] == ["https://shop.example"]
    assert jwt.get_unverified_header(issued.token)["alg"] == "EdDSA"
    listed = await list_keys(conn, agent.tenant_id, agent.agent_id)
    assert [k.key_id for k in listed] == [issued.key.key_id]
    assert issued.token not in repr(listed)


async def test_rotation_keeps_old_keys_valid_until_retired(
    conn: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(wire.JWKS_CHANNEL)
    agent = await make_agent(conn)
    old = await issue_key(conn, issuer=ISSUER, tenant_id=agent.tenant_id,
                          agent_id=agent.agent_id, kind="secret")
    old_kid = jwt.get_unverified_header(old.token)["kid"]
    new_signer = await rotate_signing_key(conn, redis)
    assert await next_message(pubsub) == "changed"
    assert (await active_signing_key(conn)).kid == new_signer.kid != old_kid
    new = await issue_key(conn, issuer=ISSUER, tenant_id=agent.tenant_id,
                          agent_id=agent.agent_id, kind="secret")
    assert jwt.get_unverified_header(new.token)["kid"] == new_signer.kid
    keyset = await jwks(conn)
    verify(old.token, keyset)
    verify(new.token, keyset)
    await retire_signing_key(conn, redis, old_kid)
    assert await next_message(pubsub) == "changed"
    await pubsub.aclose()
    keyset = await jwks(conn)
    assert old_kid not in {k["kid"] for k in keyset["keys"]}
    with pytest.raises(KeyError):
        verify(old.token, keyset)
    verify(new.token, keyset)


async def run_cmp(database_url: str, redis_url: str, *args: str) -> tuple[int, str]:
    """`python -m cmp ARGS` as an operator runs it: its exit code and what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cmp", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CMP_DATABASE_URL": database_url, "CMP_REDIS_URL": redis_url,
             "CMP_SERVICE_TOKEN": "operator-test"})
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def test_the_operator_rotates_and_retires_signing_keys(
    conn: asyncpg.Connection, redis: aioredis.Redis, database_url: str, redis_url: str
) -> None:
    first = (await active_signing_key(conn)).kid
    code, out = await run_cmp(database_url, redis_url, "retire-signing-key", first)
    assert code == 1 and f"{first} is the only active signing key; rotate first" in out
    code, out = await run_cmp(database_url, redis_url, "rotate-signing-key")
    assert code == 0 and "new signing key" in out
    second = (await active_signing_key(conn)).kid
    assert second != first and {first, second} <= {k["kid"] for k in (await jwks(conn))["keys"]}
    code, out = await run_cmp(database_url, redis_url, "retire-signing-key", first)
    assert code == 0 and f"retired signing key {first}" in out
    assert [k["kid"] for k in (await jwks(conn))["keys"]] == [second]
    code, out = await run_cmp(database_url, redis_url, "retire-signing-key", first)
    assert code == 1 and f"no active signing key '{first}'" in out


async def test_keys_only_for_the_tenants_own_agent(conn: asyncpg.Connection) -> None:
    agent = await make_agent(conn)
    with pytest.raises(NotFound):
        await issue_key(conn, issuer=ISSUER, tenant_id=str(uuid.uuid4()),
                        agent_id=agent.agent_id, kind="secret")


@pytest.mark.parametrize(("kind", "origins", "field"), [
    ("publishable", [], "origins"),
    ("secret", ["https://a.example"], "origins"),
    ("admin", [], "kind"),
    ("publishable", ["javascript:alert(1)"], "origins"),
    ("publishable", ["https://a.example/path"], "origins"),
])
async def test_bad_key_requests_name_the_field(
    conn: asyncpg.Connection, kind: str, origins: list[str], field: str
) -> None:
    agent = await make_agent(conn)
    with pytest.raises(InvalidInput) as caught:
        await issue_key(conn, issuer=ISSUER, tenant_id=agent.tenant_id,
                        agent_id=agent.agent_id, kind=kind, origins=origins)
    assert caught.value.fields is not None and field in caught.value.fields


def test_origins_are_normalised() -> None:
    assert normalise_origin("HTTP://LocalHost:80") == "http://localhost"
    assert normalise_origin("http://127.0.0.1:8082/") == "http://127.0.0.1:8082"


async def test_revocation_reaches_redis_and_survives_a_redis_wipe(
    conn: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    agent = await make_agent(conn)
    issued = await issue_key(conn, issuer=ISSUER, tenant_id=agent.tenant_id,
                             agent_id=agent.agent_id, kind="secret")
    pubsub = redis.pubsub()
    await pubsub.subscribe(wire.REVOKED_CHANNEL)
    with pytest.raises(NotFound):
        await revoke_key(conn, redis, tenant_id=str(uuid.uuid4()), key_id=issued.key.key_id)
    assert not await redis.sismember(wire.REVOKED_SET, issued.key.key_id)
    revoked = await revoke_key(conn, redis, tenant_id=agent.tenant_id, key_id=issued.key.key_id)
    assert revoked.revoked_at is not None
    assert await redis.sismember(wire.REVOKED_SET, issued.key.key_id)
    assert await next_message(pubsub) == issued.key.key_id
    await pubsub.aclose()
    await redis.flushall()
    assert await sync_revocations(conn, redis) == 1
    assert await redis.sismember(wire.REVOKED_SET, issued.key.key_id)


async def test_registry_entry_published_with_invalidation(
    conn: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    agent = await make_agent(conn)
    pubsub = redis.pubsub()
    await pubsub.subscribe(wire.REGISTRY_CHANNEL)
    await publish_entry(redis, agent)
    entry = orjson.loads(await redis.get(wire.registry_key(agent.agent_id)))
    assert entry["tenant_id"] == agent.tenant_id
    assert entry["collection"] == f"tenant_{agent.tenant_id}_agent_{agent.agent_id}"
    assert entry["limits"]["key"]["burst"] > 0
    assert await next_message(pubsub) == agent.agent_id
    await pubsub.aclose()
    changed = await save_instance(conn, AgentInstance(
        **{**_fields(agent), "status": "suspended"}))
    assert changed.version == agent.version + 1
    await redis.flushall()
    assert await republish_all(conn, redis) == 1
    entry = orjson.loads(await redis.get(wire.registry_key(agent.agent_id)))
    assert entry["status"] == "suspended" and entry["version"] == changed.version


async def test_instance_of_another_tenant_cannot_be_overwritten(conn: asyncpg.Connection) -> None:
    agent = await make_agent(conn)
    with pytest.raises(NotFound):
        await save_instance(conn, AgentInstance(
            **{**_fields(agent), "tenant_id": str(uuid.uuid4()), "name": "hijacked"}))
    assert (await load_instance(conn, agent.agent_id)).name == "Helper"
    with pytest.raises(NotFound):
        await load_instance(conn, agent.agent_id, str(uuid.uuid4()))


async def test_failed_migration_leaves_the_schema_as_it_was(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE mig_a (id int);")
    (tmp_path / "0002_bad.sql").write_text(
        "CREATE TABLE mig_b (id int); INSERT INTO missing_table VALUES (1);")
    await conn.execute("DROP TABLE schema_migrations")
    with pytest.raises(MigrationError, match="0002_bad"):
        await migrate(conn, tmp_path)
    tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
    assert "mig_a" in tables and "mig_b" not in tables
    versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
    assert versions == [1]


def _fields(agent: AgentInstance) -> dict[str, object]:
    return {name: getattr(agent, name) for name in AgentInstance.__slots__}
