"""Who is calling: users, their bearer tokens, organisations and the role a user holds in each.

Every query of the API is scoped by `Caller.org_ids(...)` in SQL. A token is shown once; only its
SHA-256 is stored, so a leaked database does not hand out sessions."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass, field

import asyncpg

from cmp.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from cmp.ids import uuid7

ROLES = ("member", "admin", "owner")
ORG_KINDS = ("provider", "customer", "both")
TOKEN_PREFIX = "skt_"


def role_rank(role: str) -> int:
    return ROLES.index(role)


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: uuid.UUID
    email: str
    is_staff: bool
    roles: dict[uuid.UUID, str] = field(default_factory=dict)

    def org_ids(
        self, at_least: str = "member", only: uuid.UUID | None = None
    ) -> list[uuid.UUID]:
        """The organisations where this user holds `at_least` this role; with `only`, just
        that one (if it is among them): a list's `org_id` filter."""
        floor = role_rank(at_least)
        return [org for org, role in self.roles.items()
                if role_rank(role) >= floor and only in (None, org)]

    def require(self, org_id: uuid.UUID, at_least: str, what: str) -> None:
        """NotFound outside the caller's organisations (existence does not leak); Forbidden
        inside one where the caller's role is too low."""
        role = self.roles.get(org_id)
        if role is None:
            raise NotFound(f"no {what} {org_id}")
        if role_rank(role) < role_rank(at_least):
            raise Forbidden(f"this needs the {at_least} role in organisation {org_id}; "
                            f"you are {role}")


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def authenticate(conn: asyncpg.Connection, authorization: str | None) -> Caller:
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthenticated("send your API token as 'Authorization: Bearer skt_...'")
    token = authorization[len("Bearer "):].strip()
    if not token.startswith(TOKEN_PREFIX):
        raise Unauthenticated("this is not a Site Kit user token")
    row = await conn.fetchrow(
        "SELECT u.user_id, u.email, u.is_staff FROM user_tokens t JOIN users u USING (user_id)"
        " WHERE t.token_hash = $1 AND t.revoked_at IS NULL"
        " AND (t.expires_at IS NULL OR t.expires_at > now())",
        hash_token(token),
    )
    if row is None:
        raise Unauthenticated("the token is unknown, expired or revoked")
    roles = await conn.fetch(
        "SELECT org_id, role FROM memberships WHERE user_id = $1", row["user_id"]
    )
    return Caller(
        user_id=row["user_id"], email=row["email"], is_staff=row["is_staff"],
        roles={r["org_id"]: r["role"] for r in roles},
    )


async def create_user(
    conn: asyncpg.Connection, *, email: str, name: str = "", is_staff: bool = False
) -> uuid.UUID:
    email = email.strip()
    if "@" not in email:
        raise InvalidInput("email must be an address", fields={"email": "not an email address"})
    user_id = uuid7()
    try:
        await conn.execute(
            "INSERT INTO users (user_id, email, name, is_staff) VALUES ($1, $2, $3, $4)",
            user_id, email, name, is_staff,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a user with email {email!r} exists", fields={"email": "taken"}) from None
    return user_id


async def find_user(conn: asyncpg.Connection, email: str) -> uuid.UUID:
    user_id: uuid.UUID | None = await conn.fetchval(
        "SELECT user_id FROM users WHERE lower(email) = lower($1)", email.strip()
    )
    if user_id is None:
        raise NotFound(f"no user with email {email!r}")
    return user_id


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token_id: uuid.UUID
    token: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime | None


async def create_token(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, name: str = "",
    expires_in: dt.timedelta | None = None,
) -> IssuedToken:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = uuid7()
    row = await conn.fetchrow(
        "INSERT INTO user_tokens (token_id, user_id, token_hash, prefix, name, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, now() + $6::interval) RETURNING created_at, expires_at",
        token_id, user_id, hash_token(token), token[:10], name, expires_in,
    )
    assert row is not None
    return IssuedToken(token_id, token, token[:10], row["created_at"], row["expires_at"])


async def create_organisation(
    conn: asyncpg.Connection, *, name: str, kind: str, owner: uuid.UUID
) -> uuid.UUID:
    if kind not in ORG_KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(ORG_KINDS)}", fields={"kind": kind})
    org_id = uuid7()
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO organisations (org_id, name, kind) VALUES ($1, $2, $3)",
            org_id, name, kind,
        )
        await add_member(conn, org_id, owner, "owner")
    return org_id


async def add_member(
    conn: asyncpg.Connection, org_id: uuid.UUID, user_id: uuid.UUID, role: str
) -> None:
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}", fields={"role": role})
    await conn.execute(
        "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)"
        " ON CONFLICT (user_id, org_id) DO UPDATE SET role = $3",
        org_id, user_id, role,
    )
