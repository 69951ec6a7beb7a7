"""The CMP's OpenAPI document against what the running CMP does: schemathesis generates
requests for every operation and checks the answers (no 5xx, documented status codes, content
types and response schemas). Not checked: that every schema-valid body is accepted, since
some rules span fields or need meaning (a flow must be a working Langflow flow; a key's limit
may not exceed the tenant's), and those answer 422 by design."""

from __future__ import annotations

import uuid

import asyncpg
import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from cmp import identity
from devstack.stack import Stack, run_coroutine


async def _owner_token(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        email = f"fuzz-{uuid.uuid4().hex[:8]}@example.test"
        user_id = await identity.create_user(conn, email=email)
        await identity.create_organisation(conn, name="Fuzz org", kind="both", owner=user_id)
        return (await identity.create_token(conn, user_id)).token
    finally:
        await conn.close()


def test_every_operation_answers_as_its_document_says(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.cmp_url}/openapi.json")
    token = run_coroutine(_owner_token(stack.database_url))
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20

    for operation in operations:
        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=12, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.generate])
        def check(case: schemathesis.Case) -> None:
            # A cursor is only valid as a list gave it out; random ones are refused with 422
            # by design (tested in tests/cmp), so generated requests go without one.
            if case.query:
                case.query.pop("cursor", None)
            case.call_and_validate(base_url=stack.cmp_url,
                                   headers={"Authorization": f"Bearer {token}"}, timeout=30,
                                   excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every operation is checked, then all reported
            failures.append(f"{operation.label}: {exc}")
    if failures:
        pytest.fail("\n\n".join(failures))
