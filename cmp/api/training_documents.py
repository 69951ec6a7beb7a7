"""`/api/training-documents`: what a buyer's agent instance answers from.

Upload text, Markdown or PDF for one of your agent instances (admin or owner); the document
is chunked, embedded and stored in the agent's vector collection before the answer, and is
`ready` then. When embedding fails the document is kept `failed` with the reason, holding no
chunks, and `POST .../{document_id}/retry` tries again. Members list, read and search.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Annotated, Literal

import asyncpg
from pydantic import BaseModel, Field, StringConstraints

from cmp import documents
from cmp.api.fields import Body, Name, Query
from cmp.api.operation import Call, Operation, Reply, UnsupportedMediaType
from cmp.api.pages import FIRST_ID, Page
from cmp.errors import CmpError, Conflict, InvalidInput, NotFound, Unavailable
from cmp.ids import uuid7
from cmp.wire import collection_name

Status = Literal["pending", "ready", "failed"]
MediaType = Literal["text/plain", "text/markdown", "application/pdf"]
SearchText = Annotated[str, StringConstraints(min_length=1, max_length=2000, pattern=r"^[^\x00]*$")]

_COLUMNS = ("document_id, tenant_id, agent_id, filename, media_type, bytes, status,"
            " failure_reason, chunk_count, created_at, updated_at")


class TrainingDocument(BaseModel):
    document_id: uuid.UUID
    tenant_id: uuid.UUID
    agent_id: uuid.UUID
    filename: str
    media_type: MediaType
    bytes: int = Field(description="size of the upload")
    status: Status
    failure_reason: str | None
    chunk_count: int
    created_at: dt.datetime
    updated_at: dt.datetime


class NewDocument(Query):
    agent_id: uuid.UUID
    filename: Name


class DocumentFilter(Query):
    agent_id: uuid.UUID | None = None
    status: Status | None = None


class SearchRequest(Body):
    agent_id: uuid.UUID
    query: SearchText
    k: int = Field(default=4, ge=1, le=20)


class SearchHit(BaseModel):
    document_id: uuid.UUID
    filename: str
    ordinal: int = Field(description="the chunk's position in its document")
    content: str
    score: float = Field(description="cosine similarity to the query")


class SearchResults(BaseModel):
    agent_id: uuid.UUID
    collection: str
    results: list[SearchHit]


async def _agent_tenant(call: Call, agent_id: uuid.UUID, role: str) -> uuid.UUID:
    tenant_id: uuid.UUID | None = await call.conn.fetchval(
        "SELECT tenant_id FROM customer_agent_configs WHERE agent_id = $1"
        " AND tenant_id = ANY($2::uuid[])", agent_id, call.caller.org_ids("member"),
    )
    if tenant_id is None:
        raise NotFound(f"no agent {agent_id}")
    call.caller.require(tenant_id, role, "agent")
    return tenant_id


async def _document(call: Call, document_id: uuid.UUID) -> TrainingDocument:
    row = await call.conn.fetchrow(
        f"SELECT {_COLUMNS} FROM training_documents WHERE document_id = $1"
        " AND tenant_id = ANY($2::uuid[])", document_id, call.caller.org_ids("member"),
    )
    if row is None:
        raise NotFound(f"no training document {document_id}")
    return TrainingDocument(**dict(row))


async def _ingest(call: Call, document: TrainingDocument, text: str) -> None:
    """Chunk, embed and store; on failure the document is `failed` and holds no chunks."""
    conn = call.conn
    embeddings = call.services.embeddings
    try:
        chunks = documents.chunk_text(text)
        vectors = await embeddings.embed(chunks)
        blank = [n for n, vector in enumerate(vectors) if not any(vector)]
        if blank:
            raise InvalidInput(
                f"{len(blank)} chunk(s) embed to a zero vector, which cosine search can never"
                f" find (the first is chunk {blank[0]}): the embeddings model reads no words there"
            )
        async with conn.transaction():
            status = await conn.fetchval(
                "SELECT status FROM training_documents WHERE document_id = $1 FOR UPDATE",
                document.document_id,
            )
            if status in (None, "ready"):  # deleted meanwhile, or a concurrent retry won
                return
            table = await documents.collection_table(
                conn, document.tenant_id, document.agent_id, embeddings.model, len(vectors[0])
            )
            await documents.store_chunks(conn, table, document.document_id, chunks, vectors)
            await conn.execute(
                "UPDATE training_documents SET status = 'ready', chunk_count = $2,"
                " failure_reason = NULL, updated_at = now() WHERE document_id = $1",
                document.document_id, len(chunks),
            )
    except Exception as exc:
        reason = exc.message if isinstance(exc, CmpError) else f"internal error: {exc!r}"
        await conn.execute(
            "UPDATE training_documents SET status = 'failed', failure_reason = $2,"
            " updated_at = now() WHERE document_id = $1 AND status <> 'ready'",
            document.document_id, reason[:1000],
        )
        if isinstance(exc, Unavailable):
            raise Unavailable(
                f"{exc.message}; document {document.document_id} is kept as failed: retry with"
                f" POST /api/training-documents/{document.document_id}/retry"
            ) from exc
        raise


async def upload_training_document(call: Call) -> Reply:
    wanted: NewDocument = call.query
    media_type = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in documents.MEDIA_TYPES:
        raise UnsupportedMediaType(f"send the document as {', '.join(documents.MEDIA_TYPES)}")
    tenant_id = await _agent_tenant(call, wanted.agent_id, "admin")
    text = await documents.extract_text_async(call.raw_body, media_type)
    document_id = uuid7()
    async with call.conn.transaction():
        await call.conn.execute(
            "INSERT INTO training_documents (document_id, tenant_id, agent_id, filename,"
            " media_type, bytes, content, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            document_id, tenant_id, wanted.agent_id, wanted.filename, media_type,
            len(call.raw_body), text, call.caller.user_id,
        )
        await call.audit("training_document.create", "training_document", document_id, tenant_id,
                         {"agent_id": str(wanted.agent_id), "filename": wanted.filename,
                          "bytes": len(call.raw_body)})
    await _ingest(call, await _document(call, document_id), text)
    return Reply(await _document(call, document_id), 201)


async def retry_training_document(call: Call) -> TrainingDocument:
    document = await _document(call, call.path_id("document_id", "training document"))
    call.caller.require(document.tenant_id, "admin", "training document")
    async with call.conn.transaction():
        text = await call.conn.fetchval(
            "UPDATE training_documents SET status = 'pending', failure_reason = NULL,"
            " updated_at = now() WHERE document_id = $1 AND status <> 'ready' RETURNING content",
            document.document_id,
        )
        if text is None:
            raise Conflict(f"training document {document.document_id} is ready already")
        await call.audit("training_document.retry", "training_document", document.document_id,
                         document.tenant_id)
    await _ingest(call, document, text)
    return await _document(call, document.document_id)


async def list_training_documents(call: Call) -> Page[TrainingDocument]:
    page = call.page
    assert page is not None
    wanted: DocumentFilter = call.query
    # One index range per organisation, merged: a small tenant's page costs what it costs alone.
    rows = await call.conn.fetch(
        "SELECT d.* FROM unnest($1::uuid[]) AS t(tenant_id) CROSS JOIN LATERAL ("
        f" SELECT {_COLUMNS} FROM training_documents WHERE tenant_id = t.tenant_id"
        "  AND document_id > $2 AND ($3::uuid IS NULL OR agent_id = $3)"
        "  AND ($4::text IS NULL OR status = $4)"
        "  ORDER BY training_documents.document_id LIMIT $5) d ORDER BY d.document_id LIMIT $5",
        call.caller.org_ids("member"), page.after[0] if page.after else FIRST_ID,
        wanted.agent_id, wanted.status, page.limit + 1,
    )
    return page.page([TrainingDocument(**dict(r)) for r in rows], lambda d: [d.document_id])


async def get_training_document(call: Call) -> TrainingDocument:
    return await _document(call, call.path_id("document_id", "training document"))


async def delete_training_document(call: Call) -> Reply:
    document = await _document(call, call.path_id("document_id", "training document"))
    call.caller.require(document.tenant_id, "admin", "training document")
    async with call.conn.transaction():
        # Its chunks go by ON DELETE CASCADE, in this transaction.
        await call.conn.execute(
            "DELETE FROM training_documents WHERE document_id = $1", document.document_id
        )
        await call.audit("training_document.delete", "training_document", document.document_id,
                         document.tenant_id, {"agent_id": str(document.agent_id)})
    return Reply(None, 204)


async def search_training_documents(call: Call) -> SearchResults:
    body: SearchRequest = call.body
    tenant_id = await _agent_tenant(call, body.agent_id, "member")
    [vector] = await call.services.embeddings.embed([body.query])
    try:
        hits = await documents.search(call.conn, body.agent_id, vector, body.k)
    except asyncpg.DataError as exc:  # a query vector of another size than the collection's
        raise Conflict(f"the query cannot be compared with this collection: {exc}") from None
    return SearchResults(agent_id=body.agent_id,
                         collection=collection_name(str(tenant_id), str(body.agent_id)),
                         results=[SearchHit(**dataclasses.asdict(hit)) for hit in hits])


OPERATIONS = [
    Operation("POST", "/api/training-documents/search",
              "The chunks of an agent's documents closest to a query", search_training_documents,
              "training-documents", body=SearchRequest, response=SearchResults, errors=(404, 409)),
    Operation("POST", "/api/training-documents",
              "Upload a document for one of your agents (admin); send the file as the body",
              upload_training_document, "training-documents", query=NewDocument,
              response=TrainingDocument, status=201,
              raw_media_types=documents.MEDIA_TYPES, errors=(403, 404, 409)),
    Operation("GET", "/api/training-documents", "Your agents' training documents",
              list_training_documents, "training-documents", query=DocumentFilter,
              response=TrainingDocument, paged=True),
    Operation("GET", "/api/training-documents/{document_id}",
              "One training document: status, chunk count, size", get_training_document,
              "training-documents", response=TrainingDocument),
    Operation("POST", "/api/training-documents/{document_id}/retry",
              "Embed a failed document again (admin)", retry_training_document,
              "training-documents", response=TrainingDocument, errors=(403, 409)),
    Operation("DELETE", "/api/training-documents/{document_id}",
              "Delete a document and its vectors (admin)", delete_training_document,
              "training-documents", status=204, errors=(403,)),
]
