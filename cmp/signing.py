"""Ed25519 signing keys for API keys, with rotation, and the JWKS the gateways verify with.

The newest key that is not retired signs. Rotating adds a new key and keeps the older ones in
the JWKS, so keys already handed out stay valid; retiring a key drops it from the JWKS, which
makes every API key it signed invalid."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from redis.exceptions import RedisError

from cmp import wire
from cmp.errors import InvalidInput, NotFound, Unavailable
from cmp.redis_clients import AnyRedis


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims, self.private_key, algorithm=wire.ALGORITHM, headers={"kid": self.kid}
        )


def _public_jwk(kid: str, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = orjson.loads(OKPAlgorithm.to_jwk(private_key.public_key()))
    jwk.update(kid=kid, alg=wire.ALGORITHM, use="sig")
    return jwk


def _load(kid: str, pem: str) -> SigningKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {kid} is not an Ed25519 key")
    return SigningKey(kid, key)


async def create_signing_key(conn: asyncpg.Connection) -> SigningKey:
    private_key = Ed25519PrivateKey.generate()
    kid = "k_" + secrets.token_urlsafe(9)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    await conn.execute(
        "INSERT INTO signing_keys (kid, private_pem, public_jwk) VALUES ($1, $2, $3)",
        kid, pem, orjson.dumps(_public_jwk(kid, private_key)).decode(),
    )
    return SigningKey(kid, private_key)


async def active_signing_key(conn: asyncpg.Connection) -> SigningKey:
    """The key that signs new API keys; the first one is made on first use."""
    row = await conn.fetchrow(
        "SELECT kid, private_pem FROM signing_keys WHERE retired_at IS NULL"
        " ORDER BY created_at DESC, kid DESC LIMIT 1"
    )
    if row is None:
        async with conn.transaction():
            # Two CMPs starting together must not both create a first key.
            await conn.execute("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")
            row = await conn.fetchrow(
                "SELECT kid, private_pem FROM signing_keys WHERE retired_at IS NULL"
                " ORDER BY created_at DESC, kid DESC LIMIT 1"
            )
            if row is None:
                return await create_signing_key(conn)
    return _load(row["kid"], row["private_pem"])


async def rotate_signing_key(conn: asyncpg.Connection, redis: AnyRedis) -> SigningKey:
    key = await create_signing_key(conn)
    await announce_jwks_change(redis)
    return key


async def retire_signing_key(conn: asyncpg.Connection, redis: AnyRedis, kid: str) -> None:
    """Drop `kid` from the JWKS: every API key signed with it stops verifying. The last active
    key cannot go (API keys could no longer be issued); rotate first."""
    async with conn.transaction():
        active = [row["kid"] for row in await conn.fetch(
            "SELECT kid FROM signing_keys WHERE retired_at IS NULL FOR UPDATE")]
        if kid not in active:
            raise NotFound(f"no active signing key {kid!r}")
        if len(active) == 1:
            raise InvalidInput(f"{kid} is the only active signing key; rotate first, so that "
                               "API keys can still be issued")
        await conn.execute("UPDATE signing_keys SET retired_at = now() WHERE kid = $1", kid)
    await announce_jwks_change(redis)


async def announce_jwks_change(redis: AnyRedis) -> None:
    """Gateways fetch the JWKS again at once, rather than when they meet an unknown kid."""
    try:
        await redis.publish(wire.JWKS_CHANNEL, "changed")
    except (RedisError, OSError) as exc:
        raise Unavailable(f"could not announce the new signing keys: {exc}") from exc


async def jwks(conn: asyncpg.Connection) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT public_jwk FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC"
    )
    return {"keys": [orjson.loads(r["public_jwk"]) for r in rows]}
