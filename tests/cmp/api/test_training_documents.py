"""`/api/training-documents`: upload, chunk, embed (the mock LLM, a real process), store in the
agent's pgvector collection, list, get, search, retry and delete, tenant by tenant."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from starlette.applications import Starlette

from cmp.api.operation import Services
from cmp.config import CmpConfig
from cmp.embeddings import EmbeddingsClient
from devstack import services
from devstack.procs import free_port
from tests.cmp.conftest import MakeUser, User

ROOT = Path(__file__).resolve().parents[3]
URL = "/api/training-documents"

MANUAL = """# Acme shop manual

Welcome to the Acme shop. We sell garden tools.

## Refunds

Refunds are paid within fourteen days to the original card. Keep the receipt.

## Shipping

Parcels leave the warehouse every weekday by courier.
"""


@pytest.fixture(scope="session")
def embeddings_llm(stack_dir: Path) -> Iterator[str]:
    """The mock LLM as a process, for its `/v1/embeddings`."""
    port = free_port()
    process = services.python_service(
        "mockllm-embeddings", "runtime.mockllm", port, stack_dir / "cmp",
        {"MOCKLLM_PORT": str(port)},
    )
    process.cwd = ROOT
    process.start()
    process.wait_ready(30)
    yield f"http://127.0.0.1:{port}/v1"
    process.stop()


@pytest.fixture
def cmp_overrides(embeddings_llm: str) -> dict[str, Any]:
    return {"embeddings_url": embeddings_llm}


@pytest.fixture
async def db(cmp_app: Starlette, cmp_config: CmpConfig) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cmp_config.database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def provider(make_user: MakeUser) -> User:
    return await make_user("provider")


async def make_agent(db: asyncpg.Connection, tenant_id: uuid.UUID, provider: User) -> uuid.UUID:
    """A provisioned-looking agent instance of `tenant_id` (the order API is not ours)."""
    provider_agent_id, order_id, agent_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    limits = orjson.dumps({"tenant": {"rate": 5, "burst": 10}, "key": {"rate": 5, "burst": 10}})
    await db.execute(
        "INSERT INTO provider_agents (provider_agent_id, org_id, name, price, limits)"
        " VALUES ($1, $2, 'Helper', '{}', $3)", provider_agent_id, provider.org_id, limits.decode(),
    )
    await db.execute(
        "INSERT INTO orders (order_id, customer_org_id, provider_agent_id, flow_version, status)"
        " VALUES ($1, $2, $3, 1, 'approved')", order_id, tenant_id, provider_agent_id,
    )
    await db.execute(
        "INSERT INTO customer_agent_configs (agent_id, tenant_id, order_id, provider_agent_id,"
        " flow_version, display_name, limits) VALUES ($1, $2, $3, $4, 1, 'Helper', $5)",
        agent_id, tenant_id, order_id, provider_agent_id, limits.decode(),
    )
    return agent_id


async def upload(
    user: User, agent_id: uuid.UUID, content: bytes | str, *, filename: str = "manual.md",
    media_type: str = "text/markdown",
) -> httpx.Response:
    body = content.encode() if isinstance(content, str) else content
    return await user.client.post(
        URL, params={"agent_id": str(agent_id), "filename": filename}, content=body,
        headers={"content-type": media_type},
    )


async def search(user: User, agent_id: uuid.UUID, query: str, k: int = 3) -> httpx.Response:
    return await user.client.post(
        f"{URL}/search", json={"agent_id": str(agent_id), "query": query, "k": k}
    )


async def chunk_rows(db: asyncpg.Connection, agent_id: uuid.UUID) -> int:
    table = await db.fetchval(
        "SELECT table_name FROM vector_collections WHERE agent_id = $1", agent_id
    )
    if table is None:
        return 0
    return int(await db.fetchval(f"SELECT count(*) FROM collections.{table}"))


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


async def test_upload_chunks_embeds_and_finds_the_right_chunk(
    make_user: MakeUser, provider: User, db: asyncpg.Connection
) -> None:
    owner = await make_user()
    agent_id = await make_agent(db, owner.org_id, provider)

    response = await upload(owner, agent_id, MANUAL)
    assert response.status_code == 201, response.text
    document = response.json()
    assert document["status"] == "ready" and document["failure_reason"] is None
    assert document["chunk_count"] == 3
    assert document["bytes"] == len(MANUAL.encode())
    assert document["agent_id"] == str(agent_id) and document["tenant_id"] == str(owner.org_id)
    assert document["media_type"] == "text/markdown" and document["filename"] == "manual.md"
    assert (await owner.client.get(f"{URL}/{document['document_id']}")).json() == document
    assert await chunk_rows(db, agent_id) == 3

    found = await search(owner, agent_id, "how many days until refunds are paid", k=2)
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["collection"] == f"tenant_{owner.org_id}_agent_{agent_id}"
    assert len(body["results"]) == 2
    best = body["results"][0]
    assert best["content"].startswith("## Refunds") and "fourteen days" in best["content"]
    assert best["document_id"] == document["document_id"] and best["filename"] == "manual.md"
    assert best["score"] > body["results"][1]["score"]

    # The collection is its own table, with an HNSW index on cosine distance.
    table = await db.fetchval(
        "SELECT table_name FROM vector_collections WHERE collection = $1", body["collection"]
    )
    indexes = [r["indexdef"] for r in await db.fetch(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'collections' AND tablename = $1",
        table,
    )]
    assert any("hnsw" in d and "vector_cosine_ops" in d for d in indexes), indexes

    audit = await db.fetch(
        "SELECT action, actor_user_id FROM audit_log WHERE object_id = $1",
        document["document_id"],
    )
    assert [(r["action"], r["actor_user_id"]) for r in audit] == [
        ("training_document.create", owner.user_id)
    ]


async def test_plain_text_and_pdf(make_user: MakeUser, provider: User, db: asyncpg.Connection):
    owner = await make_user()
    agent_id = await make_agent(db, owner.org_id, provider)
    text = await upload(owner, agent_id, "Opening hours: nine to five.", filename="hours.txt",
                        media_type="text/plain")
    assert text.status_code == 201 and text.json()["chunk_count"] == 1
    pdf = await upload(owner, agent_id, minimal_pdf("Warranty lasts three years on mowers"),
                       filename="warranty.pdf", media_type="application/pdf")
    assert pdf.status_code == 201, pdf.text
    assert pdf.json()["status"] == "ready" and pdf.json()["media_type"] == "application/pdf"
    found = (await search(owner, agent_id, "mowers warranty years", k=1)).json()["results"]
    assert found[0]["filename"] == "warranty.pdf"
    assert "Warranty lasts three years on mowers" in found[0]["content"]

    broken = await upload(owner, agent_id, b"%PDF-1.4 not really", filename="x.pdf",
                          media_type="application/pdf")
    assert broken.status_code == 422 and "PDF" in broken.json()["error"]["message"]


async def test_list_is_paged_and_filtered_by_agent_and_status(
    make_user: MakeUser, provider: User, db: asyncpg.Connection
) -> None:
    owner = await make_user()
    first = await make_agent(db, owner.org_id, provider)
    second = await make_agent(db, owner.org_id, provider)
    ids = []
    for n in range(3):
        ids.append((await upload(owner, first, f"Note {n} about sheds.")).json()["document_id"])
    other = (await upload(owner, second, "About hoses.")).json()["document_id"]

    seen: list[str] = []
    cursor = None
    while True:
        params = {"agent_id": str(first), "limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await owner.client.get(URL, params=params)).json()
        seen += [d["document_id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    everything = (await owner.client.get(URL)).json()["items"]
    assert [d["document_id"] for d in everything] == [*ids, other]
    ready = await owner.client.get(URL, params={"status": "ready", "agent_id": str(second)})
    assert [d["document_id"] for d in ready.json()["items"]] == [other]
    failed = await owner.client.get(URL, params={"status": "failed"})
    assert failed.json()["items"] == []

    # A member of a second organisation pages through both, merged in id order.
    other_org = await make_user()
    other_agent = await make_agent(db, other_org.org_id, provider)
    theirs = (await upload(other_org, other_agent, "About rakes.")).json()["document_id"]
    more = (await upload(owner, first, "About spades.")).json()["document_id"]
    await db.execute("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'member')",
                     other_org.org_id, owner.user_id)
    merged: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await owner.client.get(URL, params=params)).json()
        merged += [d["document_id"] for d in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert merged == [*ids, other, theirs, more]


async def test_validation_errors(make_user: MakeUser, provider: User, db: asyncpg.Connection):
    owner = await make_user()
    agent_id = await make_agent(db, owner.org_id, provider)

    def problem(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        error: dict[str, Any] = response.json()["error"]
        return error

    problem(await upload(owner, agent_id, "{}", media_type="application/json"), 415)
    problem(await upload(owner, agent_id, "hello", media_type="text/html"), 415)
    missing = await owner.client.post(URL, params={"filename": "a.md"}, content=b"hi",
                                      headers={"content-type": "text/markdown"})
    assert "agent_id" in problem(missing, 422)["fields"]
    assert "filename" in problem(await upload(owner, agent_id, "hi", filename=""), 422)["fields"]
    bad_agent = await owner.client.post(URL, params={"agent_id": "nope", "filename": "a.md"},
                                        content=b"hi", headers={"content-type": "text/markdown"})
    assert "agent_id" in problem(bad_agent, 422)["fields"]
    problem(await upload(owner, uuid.uuid4(), "hi"), 404)
    assert "no text" in problem(await upload(owner, agent_id, " \n\n "), 422)["message"]
    assert "UTF-8" in problem(await upload(owner, agent_id, b"\xff\xfe\xfa"), 422)["message"]
    too_big = problem(await upload(owner, agent_id, b"a" * (2 * 1024 * 1024 + 1)), 413)
    assert too_big["code"] == "too_large"

    problem(await search(owner, agent_id, "", k=1), 422)
    assert "k" in problem(await search(owner, agent_id, "x", k=0), 422)["fields"]
    assert "k" in problem(await search(owner, agent_id, "x", k=21), 422)["fields"]
    extra = await owner.client.post(f"{URL}/search", json={
        "agent_id": str(agent_id), "query": "x", "tenant_id": str(uuid.uuid4())})
    assert "tenant_id" in problem(extra, 422)["fields"]
    problem(await search(owner, uuid.uuid4(), "x"), 404)
    assert (await search(owner, agent_id, "nothing uploaded yet")).json()["results"] == []

    for path in (f"{URL}/{uuid.uuid4()}", f"{URL}/not-an-id"):
        problem(await owner.client.get(path), 404)
        problem(await owner.client.delete(path), 404)
        problem(await owner.client.post(f"{path}/retry"), 404)
    problem(await owner.client.get(URL, params={"status": "lost"}), 422)
    problem(await owner.client.get(URL, params={"limit": "101"}), 422)

    ready = (await upload(owner, agent_id, "Ready already.")).json()
    problem(await owner.client.post(f"{URL}/{ready['document_id']}/retry"), 409)
    assert await db.fetchval("SELECT count(*) FROM training_documents") == 1


async def test_members_read_and_search_but_do_not_write(
    make_user: MakeUser, provider: User, db: asyncpg.Connection
) -> None:
    owner = await make_user()
    agent_id = await make_agent(db, owner.org_id, provider)
    member = await make_user(org_id=owner.org_id, role="member")
    admin = await make_user(org_id=owner.org_id, role="admin")
    document = (await upload(admin, agent_id, MANUAL)).json()
    assert document["status"] == "ready"

    assert (await upload(member, agent_id, MANUAL)).status_code == 403
    assert (await member.client.delete(f"{URL}/{document['document_id']}")).status_code == 403
    retry = await member.client.post(f"{URL}/{document['document_id']}/retry")
    assert retry.status_code == 403
    assert (await member.client.get(f"{URL}/{document['document_id']}")).status_code == 200
    assert len((await member.client.get(URL)).json()["items"]) == 1
    assert (await search(member, agent_id, "shipping")).status_code == 200
    assert await db.fetchval("SELECT count(*) FROM training_documents") == 1


async def test_another_tenant_gets_404_and_nothing_changes(
    make_user: MakeUser, provider: User, db: asyncpg.Connection
) -> None:
    alice = await make_user()
    bob = await make_user()
    alice_agent = await make_agent(db, alice.org_id, provider)
    bob_agent = await make_agent(db, bob.org_id, provider)
    document = (await upload(alice, alice_agent, MANUAL)).json()
    await upload(bob, bob_agent, "Bob's secret: the vault code is 1234.")
    before_docs = await db.fetch("SELECT * FROM training_documents ORDER BY document_id")
    before_chunks = (await chunk_rows(db, alice_agent), await chunk_rows(db, bob_agent))
    before_audit = await db.fetchval("SELECT count(*) FROM audit_log")

    doc_url = f"{URL}/{document['document_id']}"
    for response in (
        await upload(bob, alice_agent, "Injected text."),
        await bob.client.get(doc_url),
        await bob.client.delete(doc_url),
        await bob.client.post(f"{doc_url}/retry"),
        await search(bob, alice_agent, "refunds"),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
    listed = (await bob.client.get(URL, params={"agent_id": str(alice_agent)})).json()
    assert listed["items"] == []
    assert [d["agent_id"] for d in (await bob.client.get(URL)).json()["items"]] == [
        str(bob_agent)]
    # Bob's search only ever sees Bob's collection.
    bob_hits = (await search(bob, bob_agent, "refunds fourteen days receipt", k=5)).json()
    assert all("vault" in hit["content"] for hit in bob_hits["results"])

    assert await db.fetch("SELECT * FROM training_documents ORDER BY document_id") == before_docs
    assert (await chunk_rows(db, alice_agent), await chunk_rows(db, bob_agent)) == before_chunks
    assert await db.fetchval("SELECT count(*) FROM audit_log") == before_audit


async def test_unicode_and_sql_metacharacters_are_stored_verbatim(
    make_user: MakeUser, provider: User, db: asyncpg.Connection
) -> None:
    owner = await make_user()
    agent_id = await make_agent(db, owner.org_id, provider)
    filename = "Robert'); DROP TABLE training_documents;-- Ünïcödé 文件 \"q\" %_\\.md"
    text = "Zażółć gęślą jaźń 🚀 ' OR 1=1; -- $1 \\x00? <b>bold</b> 東京 refunds"
    response = await upload(owner, agent_id, text, filename=filename)
    assert response.status_code == 201, response.text
    document = response.json()
    assert document["filename"] == filename
    fetched = await owner.client.get(f"{URL}/{document['document_id']}")
    assert fetched.json()["filename"] == filename
    [hit] = (await search(owner, agent_id, "refunds", k=1)).json()["results"]
    assert hit["content"] == text and hit["filename"] == filename

    japanese = await upload(owner, agent_id, "東京の店舗は九時に開きます", filename="東京.md")
    assert japanese.status_code == 201 and japanese.json()["status"] == "ready"
    [hit] = (await search(owner, agent_id, "東京の店舗は九時に開きます", k=1)).json()["results"]
    assert hit["filename"] == "東京.md" and hit["score"] > 0.99

    # Text with no words embeds to a zero vector, which cosine search could never find.
    emoji = await upload(owner, agent_id, "🚀 🚀 🚀", filename="rocket.md")
    assert emoji.status_code == 422 and "zero vector" in emoji.json()["error"]["message"]
    rocket = (await owner.client.get(URL, params={"status": "failed"})).json()["items"]
    assert [d["filename"] for d in rocket] == ["rocket.md"]
    assert "zero vector" in rocket[0]["failure_reason"] and rocket[0]["chunk_count"] == 0
    assert (await search(owner, agent_id, "🚀", k=5)).json()["results"] == []
    assert await db.fetchval("SELECT count(*) FROM training_documents") == 3


async def test_delete_removes_the_vectors(
    make_user: MakeUser, provider: User, db: asyncpg.Connection
) -> None:
    owner = await make_user()
    agent_id = await make_agent(db, owner.org_id, provider)
    manual = (await upload(owner, agent_id, MANUAL)).json()
    other = (await upload(owner, agent_id, "Gift cards never expire.")).json()
    assert await chunk_rows(db, agent_id) == 4

    deleted = await owner.client.delete(f"{URL}/{manual['document_id']}")
    assert deleted.status_code == 204
    assert await chunk_rows(db, agent_id) == 1
    assert (await owner.client.get(f"{URL}/{manual['document_id']}")).status_code == 404
    hits = (await search(owner, agent_id, "refunds days receipt", k=5)).json()["results"]
    assert [h["document_id"] for h in hits] == [other["document_id"]]
    assert (await owner.client.delete(f"{URL}/{manual['document_id']}")).status_code == 404
    actions = await db.fetch(
        "SELECT action FROM audit_log WHERE object_id = $1 ORDER BY audit_id",
        manual["document_id"],
    )
    assert [r["action"] for r in actions] == ["training_document.create",
                                              "training_document.delete"]


async def test_embeddings_outage_leaves_a_failed_document_to_retry(
    make_user: MakeUser, provider: User, db: asyncpg.Connection, cmp_app: Starlette
) -> None:
    owner = await make_user()
    agent_id = await make_agent(db, owner.org_id, provider)
    working: Services = cmp_app.state.services
    dead = EmbeddingsClient(f"http://127.0.0.1:{free_port()}/v1", "sk-x", "text-embedding-mock",
                            backoff_s=0.01)
    cmp_app.state.services = dataclasses.replace(working, embeddings=dead)
    try:
        response = await upload(owner, agent_id, MANUAL)
        found = await search(owner, agent_id, "refunds")
    finally:
        cmp_app.state.services = working
        await dead.aclose()

    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "unreachable" in error["message"]
    assert found.status_code == 503
    [document] = (await owner.client.get(URL)).json()["items"]
    assert document["document_id"] in error["message"] and "retry" in error["message"]
    assert document["status"] == "failed" and "unreachable" in document["failure_reason"]
    assert document["chunk_count"] == 0 and await chunk_rows(db, agent_id) == 0

    retried = await owner.client.post(f"{URL}/{document['document_id']}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "ready" and retried.json()["failure_reason"] is None
    assert retried.json()["chunk_count"] == 3 and await chunk_rows(db, agent_id) == 3


async def test_the_openapi_document_lists_the_endpoints(make_user: MakeUser) -> None:
    user = await make_user()
    paths = (await user.client.get("/openapi.json")).json()["paths"]
    upload_op = paths[URL]["post"]
    assert set(upload_op["requestBody"]["content"]) == {
        "text/plain", "text/markdown", "application/pdf"}
    assert {p["name"] for p in upload_op["parameters"]} == {"agent_id", "filename"}
    assert {"201", "403", "404", "413", "415", "422", "503"} <= set(upload_op["responses"])
    assert set(paths[f"{URL}/{{document_id}}"]) == {"get", "delete"}
    assert "post" in paths[f"{URL}/search"] and "post" in paths[f"{URL}/{{document_id}}/retry"]
