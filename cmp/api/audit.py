"""`/api/audit-log`: who did what to which object. Platform staff read all of it; an
organisation's owners read what concerns their organisation."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import orjson
from pydantic import BaseModel

from cmp.api.fields import Name, Query
from cmp.api.operation import Call, Operation
from cmp.api.pages import Page, bigint

_AFTER_NEWEST = 2**63 - 1  # above every audit id: the bound of a first page


class AuditEntry(BaseModel):
    audit_id: int
    occurred_at: dt.datetime
    actor_user_id: uuid.UUID | None
    org_id: uuid.UUID | None
    action: str
    object_type: str
    object_id: str
    details: dict[str, Any]


class AuditFilter(Query):
    org_id: uuid.UUID | None = None
    action: Name | None = None
    object_id: Name | None = None


async def list_audit_log(call: Call) -> Page[AuditEntry]:
    page = call.page
    assert page is not None
    wanted: AuditFilter = call.query
    # Newest first. Staff see every organisation; owners only the ones they own, read as one
    # index range (org_id, audit_id) per organisation, so a small organisation's page does not
    # scan everyone else's history.
    columns = ("audit_id, occurred_at, actor_user_id, org_id, action, object_type, object_id,"
               " details")
    filters = ("($2::text IS NULL OR action = $2) AND ($3::text IS NULL OR object_id = $3)"
               " AND audit_id < $4")
    before = page.after[0] if page.after else _AFTER_NEWEST
    if call.caller.is_staff:
        rows = await call.conn.fetch(
            f"SELECT {columns} FROM audit_log WHERE ($1::uuid IS NULL OR org_id = $1)"
            f" AND {filters} ORDER BY audit_id DESC LIMIT $5",
            wanted.org_id, wanted.action, wanted.object_id, before, page.limit + 1,
        )
    else:
        owned = call.caller.org_ids("owner", only=wanted.org_id)
        rows = await call.conn.fetch(
            "SELECT a.* FROM unnest($1::uuid[]) AS t(org_id) CROSS JOIN LATERAL ("
            f" SELECT {columns} FROM audit_log WHERE org_id = t.org_id AND {filters}"
            "  ORDER BY audit_id DESC LIMIT $5) a ORDER BY a.audit_id DESC LIMIT $5",
            owned, wanted.action, wanted.object_id, before, page.limit + 1,
        )
    entries = [AuditEntry(**{**dict(r), "details": orjson.loads(r["details"])}) for r in rows]
    return page.page(entries, lambda e: [e.audit_id])


OPERATIONS = [
    Operation("GET", "/api/audit-log",
              "Audit log, newest first (staff: everything; owners: their organisations)",
              list_audit_log, "audit", query=AuditFilter, response=AuditEntry, paged=True,
              cursor=(bigint,)),
]
