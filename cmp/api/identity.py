"""`/api/me`, `/api/organisations`, `/api/users`, `/api/tokens`: who is who, and their tokens."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from cmp import identity
from cmp.api.fields import Body, Email, Name
from cmp.api.operation import Call, Operation, Reply
from cmp.api.pages import Page
from cmp.errors import Forbidden, NotFound

Role = Literal["owner", "admin", "member"]
OrgKind = Literal["provider", "customer", "both"]


class Membership(BaseModel):
    org_id: uuid.UUID
    name: str
    kind: OrgKind
    role: Role


class Me(BaseModel):
    user_id: uuid.UUID
    email: str
    name: str
    is_staff: bool
    organisations: list[Membership]


class Organisation(BaseModel):
    org_id: uuid.UUID
    name: str
    kind: OrgKind
    role: Role | None
    created_at: dt.datetime


class NewOrganisation(Body):
    name: Name
    kind: OrgKind


class Member(BaseModel):
    user_id: uuid.UUID
    email: str
    name: str
    role: Role


class NewMember(Body):
    email: Email
    role: Role = "member"


class Token(BaseModel):
    token_id: uuid.UUID
    name: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None = None


class IssuedToken(Token):
    token: str = Field(description="shown once; only its hash is kept")


class NewToken(Body):
    name: Name = "api"
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class NewUser(Body):
    email: Email
    name: Name | None = None
    is_staff: bool = False


class CreatedUser(BaseModel):
    user_id: uuid.UUID
    email: str
    token: IssuedToken


async def me(call: Call) -> Me:
    user = await call.conn.fetchrow(
        "SELECT user_id, email, name, is_staff FROM users WHERE user_id = $1", call.caller.user_id
    )
    rows = await call.conn.fetch(
        "SELECT o.org_id, o.name, o.kind, m.role FROM memberships m JOIN organisations o"
        " USING (org_id) WHERE m.user_id = $1 ORDER BY o.org_id", call.caller.user_id,
    )
    return Me(**dict(user), organisations=[Membership(**dict(r)) for r in rows])


async def create_organisation(call: Call) -> Organisation:
    body: NewOrganisation = call.body
    async with call.conn.transaction():
        org_id = await identity.create_organisation(
            call.conn, name=body.name, kind=body.kind, owner=call.caller.user_id
        )
        await call.audit("organisation.create", "organisation", org_id, org_id,
                         {"name": body.name, "kind": body.kind})
    return await _organisation(call, org_id)


async def _organisation(call: Call, org_id: uuid.UUID) -> Organisation:
    row = await call.conn.fetchrow(
        "SELECT o.org_id, o.name, o.kind, o.created_at, m.role FROM organisations o"
        " JOIN memberships m ON m.org_id = o.org_id AND m.user_id = $2 WHERE o.org_id = $1",
        org_id, call.caller.user_id,
    )
    if row is None:
        raise NotFound(f"no organisation {org_id}")
    return Organisation(**dict(row))


async def list_organisations(call: Call) -> Page[Organisation]:
    page = call.page
    assert page is not None
    rows = await call.conn.fetch(
        "SELECT o.org_id, o.name, o.kind, o.created_at, m.role FROM memberships m"
        " JOIN organisations o USING (org_id) WHERE m.user_id = $1"
        " AND ($2::uuid IS NULL OR o.org_id > $2) ORDER BY o.org_id LIMIT $3",
        call.caller.user_id, page.after[0] if page.after else None, page.limit + 1,
    )
    return page.page([Organisation(**dict(r)) for r in rows], lambda o: [o.org_id])


async def get_organisation(call: Call) -> Organisation:
    return await _organisation(call, call.path_id("org_id", "organisation"))


async def add_member(call: Call) -> Reply:
    org_id = call.path_id("org_id", "organisation")
    body: NewMember = call.body
    call.caller.require(org_id, "admin", "organisation")
    if body.role == "owner":
        call.caller.require(org_id, "owner", "organisation")
    async with call.conn.transaction():
        user_id = await identity.find_user(call.conn, body.email)
        await identity.add_member(call.conn, org_id, user_id, body.role)
        await call.audit("member.add", "membership", user_id, org_id, {"role": body.role})
    row = await call.conn.fetchrow(
        "SELECT u.user_id, u.email, u.name, m.role FROM memberships m JOIN users u USING (user_id)"
        " WHERE m.org_id = $1 AND m.user_id = $2", org_id, user_id,
    )
    return Reply(Member(**dict(row)), 201)


async def list_members(call: Call) -> Page[Member]:
    org_id = call.path_id("org_id", "organisation")
    call.caller.require(org_id, "member", "organisation")
    page = call.page
    assert page is not None
    rows = await call.conn.fetch(
        "SELECT u.user_id, u.email, u.name, m.role FROM memberships m JOIN users u USING (user_id)"
        " WHERE m.org_id = $1 AND ($2::uuid IS NULL OR u.user_id > $2)"
        " ORDER BY u.user_id LIMIT $3",
        org_id, page.after[0] if page.after else None, page.limit + 1,
    )
    return page.page([Member(**dict(r)) for r in rows], lambda m: [m.user_id])


async def remove_member(call: Call) -> Reply:
    org_id = call.path_id("org_id", "organisation")
    user_id = call.path_id("user_id", "member")
    call.caller.require(org_id, "owner", "organisation")
    async with call.conn.transaction():
        owners = await call.conn.fetchval(
            "SELECT count(*) FROM memberships WHERE org_id = $1 AND role = 'owner'"
            " AND user_id <> $2", org_id, user_id,
        )
        if owners == 0:
            raise Forbidden("an organisation keeps at least one owner")
        removed = await call.conn.fetchval(
            "DELETE FROM memberships WHERE org_id = $1 AND user_id = $2 RETURNING user_id",
            org_id, user_id,
        )
        if removed is None:
            raise NotFound(f"no member {user_id} in this organisation")
        await call.audit("member.remove", "membership", user_id, org_id)
    return Reply(None, 204)


def _issued(issued: identity.IssuedToken, name: str) -> IssuedToken:
    return IssuedToken(
        token_id=issued.token_id, name=name, prefix=issued.prefix, token=issued.token,
        created_at=issued.created_at, expires_at=issued.expires_at,
    )


async def create_token(call: Call) -> Reply:
    body: NewToken = call.body
    expires = dt.timedelta(days=body.expires_in_days) if body.expires_in_days else None
    async with call.conn.transaction():
        issued = await identity.create_token(
            call.conn, call.caller.user_id, name=body.name, expires_in=expires
        )
        await call.audit("token.create", "user_token", issued.token_id, None)
    return Reply(_issued(issued, body.name), 201)


async def list_tokens(call: Call) -> Page[Token]:
    page = call.page
    assert page is not None
    rows = await call.conn.fetch(
        "SELECT token_id, name, prefix, created_at, expires_at, revoked_at FROM user_tokens"
        " WHERE user_id = $1 AND ($2::uuid IS NULL OR token_id > $2)"
        " ORDER BY token_id LIMIT $3",
        call.caller.user_id, page.after[0] if page.after else None, page.limit + 1,
    )
    return page.page([Token(**dict(r)) for r in rows], lambda t: [t.token_id])


async def revoke_token(call: Call) -> Reply:
    token_id = call.path_id("token_id", "token")
    async with call.conn.transaction():
        done = await call.conn.fetchval(
            "UPDATE user_tokens SET revoked_at = coalesce(revoked_at, now())"
            " WHERE token_id = $1 AND user_id = $2 RETURNING token_id",
            token_id, call.caller.user_id,
        )
        if done is None:
            raise NotFound(f"no token {token_id}")
        await call.audit("token.revoke", "user_token", token_id, None)
    return Reply(None, 204)


async def create_user(call: Call) -> Reply:
    if not call.caller.is_staff:
        raise Forbidden("only platform staff create users; ask an organisation owner to add you")
    body: NewUser = call.body
    async with call.conn.transaction():
        user_id = await identity.create_user(
            call.conn, email=body.email, name=body.name or "", is_staff=body.is_staff
        )
        issued = await identity.create_token(call.conn, user_id, name="initial")
        await call.audit("user.create", "user", user_id, None, {"email": body.email})
    return Reply(CreatedUser(user_id=user_id, email=body.email, token=_issued(issued, "initial")),
                 201)


OPERATIONS = [
    Operation("GET", "/api/me", "The signed-in user and their organisations", me, "identity",
              response=Me),
    Operation("POST", "/api/organisations", "Create an organisation; you become its owner",
              create_organisation, "identity", body=NewOrganisation, response=Organisation,
              status=201),
    Operation("GET", "/api/organisations", "Your organisations", list_organisations, "identity",
              response=Organisation, paged=True),
    Operation("GET", "/api/organisations/{org_id}", "One of your organisations",
              get_organisation, "identity", response=Organisation),
    Operation("POST", "/api/organisations/{org_id}/members",
              "Add a user to the organisation (admin; owner to grant owner)", add_member,
              "identity", body=NewMember, response=Member, status=201, errors=(403,)),
    Operation("GET", "/api/organisations/{org_id}/members", "Members of the organisation",
              list_members, "identity", response=Member, paged=True),
    Operation("DELETE", "/api/organisations/{org_id}/members/{user_id}",
              "Remove a member (owner)", remove_member, "identity", status=204, errors=(403,)),
    Operation("POST", "/api/tokens", "Create an API token for yourself (shown once)",
              create_token, "identity", body=NewToken, response=IssuedToken, status=201),
    Operation("GET", "/api/tokens", "Your tokens, masked", list_tokens, "identity",
              response=Token, paged=True),
    Operation("DELETE", "/api/tokens/{token_id}", "Revoke one of your tokens", revoke_token,
              "identity", status=204),
    Operation("POST", "/api/users", "Create a user with a first token (platform staff)",
              create_user, "identity", body=NewUser, response=CreatedUser, status=201,
              errors=(403, 409)),
]
