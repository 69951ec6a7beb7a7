"""Training documents for flows: the chunks of one agent instance's collection closest to a text.

The control plane writes the collections (cmp.documents): `vector_collections` maps a wire
name `tenant_{t}_agent_{a}` to its table `collections.agent_<hex>`. Here they are only read,
through a pool on RUNTIME_VECTORS_DATABASE_URL (a read-only role is enough). The collection
searched is always the run's `collection` variable, which the gateway takes from the registry
entry; the component that calls this has no input to name another, so a seller's flow cannot
read a tenant it is not running for. The database URL never enters a flow or its variables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import asyncpg
import httpx

# Where the engine puts this object in each run's graph context, and the variable it reads.
CONTEXT_KEY = "sitekit_tenant_documents"
COLLECTION_VARIABLE = "collection"
MAX_RESULTS = 20
MAX_QUERY_CHARS = 2000

_COLLECTION = re.compile(r"^tenant_[0-9a-f-]{36}_agent_[0-9a-f-]{36}$")
_TABLE = re.compile(r"^agent_[0-9a-f]{32}$")
_TIMEOUT = httpx.Timeout(10.0, connect=3.0)


class RetrievalError(Exception):
    """The documents cannot be searched now; the run fails with this message."""


class TenantDocuments:
    """Made in the runtime's lifespan when RUNTIME_VECTORS_DATABASE_URL is set."""

    def __init__(
        self, pool: asyncpg.Pool, embeddings_url: str, embeddings_api_key: str,
        embeddings_model: str,
    ) -> None:
        self._pool = pool
        self._model = embeddings_model
        self._http = httpx.AsyncClient(
            base_url=embeddings_url.rstrip("/") + "/", timeout=_TIMEOUT,
            headers={"Authorization": f"Bearer {embeddings_api_key}"},
        )

    @classmethod
    async def open(
        cls, database_url: str, embeddings_url: str, embeddings_api_key: str,
        embeddings_model: str,
    ) -> TenantDocuments:
        # No connection at start: the runtime serves flows without documents while the
        # database is away, and reconnects on the next search.
        pool = await asyncpg.create_pool(
            database_url, min_size=0, max_size=4, timeout=5, command_timeout=10
        )
        return cls(pool, embeddings_url, embeddings_api_key, embeddings_model)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._pool.close()

    async def search(self, variables: Mapping[str, Any], query: str, k: int) -> list[str]:
        """The run's collection's chunks closest to `query`, best first."""
        collection = str(variables.get(COLLECTION_VARIABLE) or "")
        if not _COLLECTION.match(collection):
            raise RetrievalError("the request names no valid collection")
        k = max(1, min(int(k), MAX_RESULTS))
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT table_name, model, dimensions FROM vector_collections"
                    " WHERE collection = $1", collection,
                )
                if row is None:  # no document uploaded yet
                    return []
                if row["model"] != self._model or not _TABLE.match(row["table_name"]):
                    raise RetrievalError(
                        f"collection {collection} was embedded with {row['model']!r}; this"
                        f" runtime embeds queries with {self._model!r}"
                    )
                vector = await self._embed(query[:MAX_QUERY_CHARS], row["dimensions"])
                if vector is None:  # a query without words: nothing is close to it
                    return []
                rows = await conn.fetch(
                    f"SELECT content FROM collections.{row['table_name']}"
                    " ORDER BY embedding <=> $1::vector LIMIT $2", vector, k,
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RetrievalError(f"the documents database is unavailable: {exc}") from exc
        return [str(r["content"]) for r in rows]

    async def _embed(self, text: str, dimensions: int) -> str | None:
        body = {"model": self._model, "input": [text], "encoding_format": "float"}
        try:
            response = await self._http.post("embeddings", json=body)
            response.raise_for_status()
            vector = [float(x) for x in response.json()["data"][0]["embedding"]]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise RetrievalError(f"the embeddings endpoint failed: {exc!r}") from exc
        if len(vector) != dimensions:
            raise RetrievalError(
                f"the query embeds to {len(vector)} dimensions, the collection to {dimensions}"
            )
        if not any(vector):
            return None
        return "[" + ",".join(repr(x) for x in vector) + "]"
