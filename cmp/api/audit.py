"""`/api/audit-log`: who did what to which object. Platform staff read all of it; an
organisation's owners read what concerns their organisation."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import orjson
from pydantic import BaseModel

from cmp.api.fields import Query
from cmp.api.operation import Call, Operation
from cmp.api.pages import Page


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
    action: str | None = None
    object_id: str | None = None


async def list_audit_log(call: Call) -> Page[AuditEntry]:
    page = call.page
    assert page is not None
    wanted: AuditFilter = call.query
    # Newest first. Staff see every organisation; owners only the ones they own.
    visible = None if call.caller.is_staff else call.caller.org_ids("owner")
    rows = await call.conn.fetch(
        "SELECT audit_id, occurred_at, actor_user_id, org_id, action, object_type, object_id,"
        " details FROM audit_log"
        " WHERE ($1::uuid[] IS NULL OR org_id = ANY($1))"
        " AND ($2::uuid IS NULL OR org_id = $2) AND ($3::text IS NULL OR action = $3)"
        " AND ($4::text IS NULL OR object_id = $4) AND ($5::bigint IS NULL OR audit_id < $5)"
        " ORDER BY audit_id DESC LIMIT $6",
        visible, wanted.org_id, wanted.action, wanted.object_id,
        page.after[0] if page.after else None, page.limit + 1,
    )
    entries = [AuditEntry(**{**dict(r), "details": orjson.loads(r["details"])}) for r in rows]
    return page.page(entries, lambda e: [e.audit_id])


OPERATIONS = [
    Operation("GET", "/api/audit-log",
              "Audit log, newest first (staff: everything; owners: their organisations)",
              list_audit_log, "audit", query=AuditFilter, response=AuditEntry, paged=True,
              cursor=(int,)),
]
