"""The chat widget's bundle, read once at start and served three ways:

- `GET /widget.js`: the current bundle, cached for five minutes (ETag for revalidation);
- `GET /widget/{version}/widget.js`: the same bytes under a name that never changes meaning,
  cached for a year as immutable, for pages that pin it with Subresource Integrity;
- `GET /widget.json`: the manifest naming that path and its `integrity` (sha384, base64).

A gateway started without a built bundle still serves chats: these three answer 404
`not_found`, and the start-up log says which file is missing.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.errors import NotFound
from gateway.responses import Headers, Receive, Scope, Send, send_body, send_error

log = logging.getLogger("sitekit.gateway")

JAVASCRIPT = b"text/javascript; charset=utf-8"
SHORT_CACHE = b"public, max-age=300"
IMMUTABLE = b"public, max-age=31536000, immutable"
# Pages may load the bundle with crossorigin="anonymous" (needed for SRI) from any origin, and
# with Cross-Origin-Embedder-Policy; it holds nothing secret.
_SHARED = [
    (b"access-control-allow-origin", b"*"),
    (b"cross-origin-resource-policy", b"cross-origin"),
    (b"x-content-type-options", b"nosniff"),
]


@dataclass(frozen=True, slots=True)
class WidgetBundle:
    body: bytes
    gzipped: bytes
    version: str  # the first 16 hex digits of the bundle's SHA-384
    integrity: str  # Subresource Integrity: "sha384-" + base64 of the SHA-384

    @classmethod
    def read(cls, path: Path) -> WidgetBundle | None:
        try:
            body = path.read_bytes()
        except OSError as exc:
            log.warning(
                "the widget bundle %s cannot be read (%s): /widget.js answers 404 until the "
                "gateway restarts with it; `make widget` builds it", path, exc.strerror or exc,
            )
            return None
        digest = hashlib.sha384(body).digest()
        return cls(
            body=body,
            gzipped=gzip.compress(body, compresslevel=9, mtime=0),
            version=digest.hex()[:16],
            integrity="sha384-" + base64.b64encode(digest).decode(),
        )

    @property
    def path(self) -> str:
        return f"/widget/{self.version}/widget.js"

    def manifest(self) -> bytes:
        return orjson.dumps({
            "version": self.version,
            "url": self.path,
            "integrity": self.integrity,
            "bytes": len(self.body),
            "gzip_bytes": len(self.gzipped),
        })


class WidgetEndpoint:
    """`/widget.js`, `/widget/{version}/widget.js` (with `versioned=True`) and `/widget.json`
    (with `manifest=True`)."""

    def __init__(
        self, bundle: WidgetBundle | None, *, versioned: bool = False, manifest: bool = False
    ) -> None:
        self._bundle = bundle
        self._versioned = versioned
        self._manifest = manifest
        self._manifest_body = bundle.manifest() if bundle is not None else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id: str = scope["state"]["request_id"]
        bundle = self._bundle
        if bundle is None:
            await send_error(send, NotFound("the chat widget is not available on this gateway"),
                             request_id, _SHARED)
            return
        if self._manifest:
            await send_body(send, 200, self._manifest_body,
                            [*_SHARED, (b"cache-control", SHORT_CACHE)])
            return
        if self._versioned and scope["path_params"]["version"] != bundle.version:
            await send_error(send, NotFound(
                "no such widget version on this gateway; /widget.json names the current one"
            ), request_id, _SHARED)
            return
        gzipped = b"gzip" in _header(scope, b"accept-encoding")
        etag = f'"{bundle.version}{"-gz" if gzipped else ""}"'.encode()
        headers: Headers = [
            *_SHARED,
            (b"cache-control", IMMUTABLE if self._versioned else SHORT_CACHE),
            (b"etag", etag),
            (b"vary", b"Accept-Encoding"),
        ]
        if etag in _header(scope, b"if-none-match"):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if gzipped:
            headers.append((b"content-encoding", b"gzip"))
        # For HEAD the server drops the body and keeps its Content-Length.
        await send_body(send, 200, bundle.gzipped if gzipped else bundle.body, headers, JAVASCRIPT)


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""
