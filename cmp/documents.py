"""Training documents: their text, its chunks, and the agent's vector collection.

A document's chunks are written in the same transaction that marks it ready, so a collection
never holds part of a document; delete a document and its chunks go with it (a foreign key
with ON DELETE CASCADE). Each collection is one table `collections.agent_<hex>` with an HNSW
index (cosine); `vector_collections` maps the wire name `tenant_{t}_agent_{a}` to it.
"""

from __future__ import annotations

import asyncio
import io
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from cmp.errors import Conflict, InvalidInput, TooLarge
from cmp.wire import collection_name

MEDIA_TYPES = ("text/plain", "text/markdown", "application/pdf")
MAX_TEXT_CHARS = 1_000_000
CHUNK_CHARS = 1200
OVERLAP_CHARS = 200

_HEADING = re.compile(r"^#{1,6}\s")
_BLANK_LINES = re.compile(r"\n\s*\n")
_TABLE = re.compile(r"^agent_[0-9a-f]{32}$")


def extract_text(raw: bytes, media_type: str) -> str:
    """The document's text; NUL is dropped since PostgreSQL's text cannot hold it."""
    if media_type == "application/pdf":
        text = _pdf_text(raw)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"the document is not UTF-8 text: {exc}") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    if len(text) > MAX_TEXT_CHARS:
        raise TooLarge(f"the document's text is over the limit of {MAX_TEXT_CHARS} characters")
    if not text.strip():
        raise InvalidInput("the document has no text")
    return text


def _pdf_text(raw: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(raw))
        pages: list[str] = []
        size = 0
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            size += len(pages[-1])
            if size > MAX_TEXT_CHARS:  # stop early: a small PDF can inflate to a lot of text
                break
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidInput(f"the PDF cannot be read: {exc}") from None
    return "\n\n".join(pages)


async def extract_text_async(raw: bytes, media_type: str) -> str:
    """`extract_text` off the event loop: parsing a PDF is CPU work."""
    if media_type == "application/pdf":
        return await asyncio.to_thread(extract_text, raw, media_type)
    return extract_text(raw, media_type)


def chunk_text(text: str, size: int = CHUNK_CHARS, overlap: int = OVERLAP_CHARS) -> list[str]:
    """Chunks of at most `size` characters along paragraphs and headings.

    A Markdown heading starts a new chunk, and a chunk inside a section repeats its heading
    so it still says what it is about. Consecutive chunks of one section share up to
    `overlap` characters, so a sentence cut at a boundary is whole in one of them.
    """
    assert 0 <= overlap < size // 2
    chunks: list[str] = []
    heading = ""
    current = ""
    for block in _blocks(text):
        if _HEADING.match(block):
            if current.strip() and current != heading:
                chunks.append(current)
            heading = block[: size // 4]
            current = heading
            continue
        prefix = heading + "\n\n" if heading else ""
        for piece in _pieces(block, size - len(prefix) - overlap - 2):
            joined = f"{current}\n\n{piece}" if current else piece
            if len(joined) <= size:
                current = joined
                continue
            if current.strip() and current != heading:
                chunks.append(current)
            tail = _tail(current, overlap) if current != heading else ""
            current = prefix + (f"{tail}\n\n" if tail else "") + piece
    if current.strip() and (current != heading or not chunks):
        chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


def _blocks(text: str) -> list[str]:
    """Paragraphs, with every heading line a block of its own."""
    blocks: list[str] = []
    for paragraph in _BLANK_LINES.split(text):
        lines: list[str] = []
        for line in paragraph.split("\n"):
            if _HEADING.match(line):
                if lines:
                    blocks.append("\n".join(lines).strip())
                    lines = []
                blocks.append(line.strip())
            else:
                lines.append(line)
        if lines:
            blocks.append("\n".join(lines).strip())
    return [b for b in blocks if b]


def _pieces(block: str, limit: int) -> list[str]:
    """The block cut at whitespace into pieces of at most `limit` characters."""
    pieces: list[str] = []
    while len(block) > limit:
        cut = block.rfind(" ", limit // 2, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(block[:cut].strip())
        block = block[cut:].strip()
    if block:
        pieces.append(block)
    return pieces


def _tail(text: str, overlap: int) -> str:
    if overlap == 0 or len(text) <= overlap:
        return text if overlap else ""
    start = text.find(" ", len(text) - overlap)
    return text[start + 1:] if start >= 0 else text[-overlap:]


def vector_literal(vector: Sequence[float]) -> str:
    """pgvector's text form, cast with `::vector` in SQL (no codec per connection needed)."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


async def collection_table(
    conn: asyncpg.Connection, tenant_id: uuid.UUID, agent_id: uuid.UUID, model: str,
    dimensions: int,
) -> str:
    """The agent's collection table, made on first use; call inside the write's transaction."""
    name = collection_name(str(tenant_id), str(agent_id))
    # Two first uploads at once must not both create the table.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
    row = await conn.fetchrow(
        "SELECT table_name, dimensions FROM vector_collections WHERE collection = $1", name
    )
    if row is not None:
        if row["dimensions"] != dimensions:
            raise Conflict(
                f"the embeddings model now answers {dimensions} dimensions; this agent's"
                f" collection holds {row['dimensions']}: delete its documents and upload again"
            )
        return str(row["table_name"])
    table = f"agent_{agent_id.hex}"
    await conn.execute(
        f"CREATE TABLE collections.{table} ("
        " chunk_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " document_id uuid NOT NULL"
        "  REFERENCES public.training_documents (document_id) ON DELETE CASCADE,"
        " ordinal integer NOT NULL,"
        " content text NOT NULL,"
        f" embedding vector({int(dimensions)}) NOT NULL)"
    )
    await conn.execute(f"CREATE INDEX ON collections.{table} (document_id)")
    await conn.execute(
        f"CREATE INDEX ON collections.{table} USING hnsw (embedding vector_cosine_ops)"
    )
    await conn.execute(
        "INSERT INTO vector_collections (collection, tenant_id, agent_id, table_name, model,"
        " dimensions) VALUES ($1, $2, $3, $4, $5, $6)",
        name, tenant_id, agent_id, table, model, dimensions,
    )
    return table


async def store_chunks(
    conn: asyncpg.Connection, table: str, document_id: uuid.UUID, chunks: Sequence[str],
    vectors: Sequence[Sequence[float]],
) -> None:
    assert _TABLE.match(table) and len(chunks) == len(vectors)
    await conn.execute(
        f"INSERT INTO collections.{table} (document_id, ordinal, content, embedding)"
        " SELECT $1, o, c, e::vector FROM unnest($2::int[], $3::text[], $4::text[]) AS t(o, c, e)",
        document_id, list(range(len(chunks))), list(chunks), [vector_literal(v) for v in vectors],
    )


@dataclass(frozen=True, slots=True)
class Hit:
    document_id: uuid.UUID
    filename: str
    ordinal: int
    content: str
    score: float


async def search(
    conn: asyncpg.Connection, agent_id: uuid.UUID, vector: Sequence[float], k: int
) -> list[Hit]:
    """The `k` chunks of this agent's collection closest to `vector` (cosine), best first.
    A zero vector has no direction, so nothing is close to it."""
    if not any(vector):
        return []
    table = await conn.fetchval(
        "SELECT table_name FROM vector_collections WHERE agent_id = $1", agent_id
    )
    if table is None:
        return []
    assert _TABLE.match(table)
    rows = await conn.fetch(
        "SELECT c.document_id, d.filename, c.ordinal, c.content, c.distance FROM ("
        f" SELECT document_id, ordinal, content, embedding <=> $1::vector AS distance"
        f" FROM collections.{table} ORDER BY embedding <=> $1::vector LIMIT $2) c"
        " JOIN training_documents d USING (document_id) ORDER BY c.distance",
        vector_literal(vector), k,
    )
    return [
        Hit(r["document_id"], r["filename"], r["ordinal"], r["content"], _score(r["distance"]))
        for r in rows
    ]


def _score(distance: float) -> float:
    return 1.0 - float(distance)
