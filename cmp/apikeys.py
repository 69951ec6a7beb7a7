"""API keys: JWTs signed with the active signing key. The token is shown once; the CMP keeps
its id, a display prefix, type, origins and revocation. Revoking puts the key id in a Redis set
and publishes it, so every gateway refuses the key within a second."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
from redis.exceptions import RedisError

from cmp import wire
from cmp.errors import InvalidInput, NotFound, Unavailable
from cmp.redis_clients import AnyRedis, write_and_announce
from cmp.registry import load_instance
from cmp.signing import active_signing_key


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    tenant_id: str
    agent_id: str
    kind: str
    prefix: str
    origins: tuple[str, ...]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: ApiKey
    token: str


def normalise_origin(origin: str) -> str:
    """`https://shop.example` form: scheme and host (and a non-default port), nothing else."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"origin {origin!r} must look like https://shop.example",
            fields={"origins": f"{origin!r} is not an http(s) origin"},
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise InvalidInput(
            f"origin {origin!r} must have no path, query or credentials",
            fields={"origins": f"{origin!r} is not a bare origin"},
        )
    host = parts.hostname.lower()
    default = {"http": 80, "https": 443}[parts.scheme]
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{host}{port}"


def normalise_origins(raw: list[str] | tuple[str, ...], field: str) -> list[str]:
    """Each origin normalised, duplicates dropped; a bad one is named as `field.<index>`."""
    clean: list[str] = []
    for index, origin in enumerate(raw):
        try:
            clean.append(normalise_origin(origin))
        except InvalidInput as exc:
            raise InvalidInput(exc.message, fields={f"{field}.{index}": exc.message}) from None
    return list(dict.fromkeys(clean))


KEY_COLUMNS = (
    "key_id::text, tenant_id::text, agent_id::text, kind, prefix, origins,"
    " created_at, expires_at, revoked_at"
)


def key_from_row(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"], tenant_id=row["tenant_id"], agent_id=row["agent_id"],
        kind=row["kind"], prefix=row["prefix"], origins=tuple(row["origins"]),
        created_at=row["created_at"], expires_at=row["expires_at"], revoked_at=row["revoked_at"],
    )


async def issue_key(
    conn: asyncpg.Connection,
    *,
    issuer: str,
    tenant_id: str,
    agent_id: str,
    kind: str,
    origins: list[str] | tuple[str, ...] = (),
    expires_in: dt.timedelta | None = None,
) -> IssuedKey:
    if kind not in wire.KEY_KINDS:
        raise InvalidInput(
            f"key type must be one of {', '.join(wire.KEY_KINDS)}", fields={"kind": kind}
        )
    clean_origins = tuple(dict.fromkeys(normalise_origin(o) for o in origins))
    if kind == "publishable" and not clean_origins:
        raise InvalidInput(
            "a publishable key needs at least one allowed origin",
            fields={"origins": "required for publishable keys"},
        )
    if kind == "secret" and clean_origins:
        raise InvalidInput(
            "origins apply to publishable keys only", fields={"origins": "not allowed"}
        )
    await load_instance(conn, agent_id, tenant_id)  # NotFound unless the tenant owns it
    signer = await active_signing_key(conn)
    key_id = str(uuid.uuid4())
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": issuer, "aud": wire.AUDIENCE, "jti": key_id, "tid": tenant_id,
        "aid": agent_id, "kty": kind, "iat": now,
    }
    expires_at = None
    if expires_in is not None:
        claims["exp"] = now + int(expires_in.total_seconds())
        expires_at = dt.datetime.fromtimestamp(now, dt.UTC) + expires_in
    if clean_origins:
        claims["origins"] = list(clean_origins)
    token = signer.sign(claims)
    row = await conn.fetchrow(
        "INSERT INTO api_keys (key_id, tenant_id, agent_id, kind, prefix, origins, expires_at)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}",
        uuid.UUID(key_id), uuid.UUID(tenant_id), uuid.UUID(agent_id), kind,
        token[-6:], list(clean_origins), expires_at,
    )
    assert row is not None
    return IssuedKey(key_from_row(row), token)


async def list_keys(conn: asyncpg.Connection, tenant_id: str, agent_id: str) -> list[ApiKey]:
    rows = await conn.fetch(
        f"SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND agent_id = $2"
        " ORDER BY created_at, key_id",
        uuid.UUID(tenant_id), uuid.UUID(agent_id),
    )
    return [key_from_row(r) for r in rows]


async def revoke_key(
    conn: asyncpg.Connection, redis: AnyRedis, *, tenant_id: str, key_id: str
) -> ApiKey:
    """Revoke a key of this tenant. Gateways are told first: should the database write fail
    after that, the key is refused a little early rather than served a little late."""
    try:
        key_uuid = uuid.UUID(key_id)
    except ValueError:
        raise NotFound(f"no API key {key_id!r}") from None
    row = await conn.fetchrow(
        f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1 AND tenant_id = $2",
        key_uuid, uuid.UUID(tenant_id),
    )
    if row is None:
        raise NotFound(f"no API key {key_id!r}")
    await announce_revocations(redis, [key_id])
    row = await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())"
        f" WHERE key_id = $1 AND tenant_id = $2 RETURNING {KEY_COLUMNS}",
        key_uuid, uuid.UUID(tenant_id),
    )
    assert row is not None
    return key_from_row(row)


async def announce_revocations(redis: AnyRedis, key_ids: list[str]) -> None:
    if not key_ids:
        return
    try:
        await write_and_announce(
            redis, lambda pipe: pipe.sadd(wire.REVOKED_SET, *key_ids), wire.REVOKED_CHANNEL,
            key_ids,
        )
    except (RedisError, OSError) as exc:
        raise Unavailable(f"could not announce the revocation: {exc}") from exc


async def sync_revocations(conn: asyncpg.Connection, redis: AnyRedis) -> int:
    """Put every revoked key id back in Redis (after Redis lost its data)."""
    rows = await conn.fetch("SELECT key_id::text FROM api_keys WHERE revoked_at IS NOT NULL")
    await announce_revocations(redis, [r["key_id"] for r in rows])
    return len(rows)
