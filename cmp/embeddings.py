"""An OpenAI-compatible embeddings client (`POST {base}/embeddings`), the mock LLM in dev.

Texts go in batches, each request under a timeout, retried a bounded number of times with
jitter when the endpoint is unreachable or failing. What goes wrong is translated where it
enters: the endpoint down, failing or answering nonsense is `Unavailable`; the endpoint
refusing the text itself (400, 413, 422) is `InvalidInput`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import httpx

from cmp.config import CmpConfig
from cmp.errors import InvalidInput, Unavailable

BATCH_SIZE = 64
ATTEMPTS = 3
TIMEOUT = httpx.Timeout(20.0, connect=3.0)
_REFUSED_TEXT = (400, 413, 422)


class EmbeddingsClient:
    """One per process, made in the app's lifespan; `aclose` it when the app stops."""

    def __init__(
        self, base_url: str, api_key: str, model: str, *,
        transport: httpx.AsyncBaseTransport | None = None, backoff_s: float = 0.2,
    ) -> None:
        self.model = model
        self._backoff_s = backoff_s
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/", timeout=TIMEOUT, transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    @classmethod
    def from_config(cls, config: CmpConfig) -> EmbeddingsClient:
        return cls(config.embeddings_url, config.embeddings_api_key, config.embeddings_model)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order; all of the same dimension."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), BATCH_SIZE):
            vectors.extend(await self._batch(list(texts[start:start + BATCH_SIZE])))
        if vectors and len({len(v) for v in vectors}) != 1:
            raise Unavailable("the embeddings endpoint answered vectors of different sizes")
        return vectors

    async def _batch(self, texts: list[str]) -> list[list[float]]:
        body = {"model": self.model, "input": texts, "encoding_format": "float"}
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = await self._http.post("embeddings", json=body)
            except httpx.HTTPError as exc:
                problem = f"the embeddings endpoint is unreachable: {type(exc).__name__}"
            else:
                if response.status_code in _REFUSED_TEXT:
                    raise InvalidInput(
                        f"the embeddings endpoint refused the text: {_message(response)}"
                    )
                if response.status_code == 200:
                    return _vectors(response, len(texts))
                problem = (f"the embeddings endpoint answered {response.status_code}: "
                           f"{_message(response)}")
            if attempt < ATTEMPTS:
                await asyncio.sleep(self._backoff_s * attempt * (0.5 + random.random()))
        raise Unavailable(problem)


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:200]
    return response.text[:200] or response.reason_phrase


def _vectors(response: httpx.Response, expected: int) -> list[list[float]]:
    try:
        data: Any = response.json()["data"]
        ordered = sorted(data, key=lambda item: int(item["index"]))
        vectors = [[float(x) for x in item["embedding"]] for item in ordered]
    except (ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"the embeddings endpoint answered malformed JSON: {exc}") from None
    if len(vectors) != expected or not all(vectors):
        raise Unavailable(
            f"the embeddings endpoint answered {len(vectors)} vectors for {expected} texts"
        )
    return vectors
