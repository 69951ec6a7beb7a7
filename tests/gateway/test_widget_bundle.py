"""The gateway's widget routes, on the app itself: a bundle read once at build, or none at all."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from gateway.app import build_app
from gateway.config import GatewayConfig

Client = Callable[[Path], httpx.AsyncClient]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    made: list[httpx.AsyncClient] = []

    def make(bundle: Path) -> httpx.AsyncClient:
        # Nothing here opens a connection: the widget routes need no lifespan.
        config = GatewayConfig(
            redis_url="redis://127.0.0.1:1/0", kafka_bootstrap="127.0.0.1:1",
            jwks_url="http://127.0.0.1:1/.well-known/jwks.json", issuer="test",
            runtime_token="t", cmp_url="http://127.0.0.1:1", cmp_token="t",
            spool_dir=tmp_path / "spool", instance="test", widget_bundle=bundle,
        )
        transport = httpx.ASGITransport(app=build_app(config))
        made.append(httpx.AsyncClient(transport=transport, base_url="http://gateway"))
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


async def test_without_a_bundle_the_widget_routes_say_so_and_the_rest_serves(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = client(tmp_path / "missing.js")
    assert "missing.js" in caplog.text and "make widget" in caplog.text
    for path in ("/widget.js", "/widget.json", "/widget/0123456789abcdef/widget.js"):
        response = await gateway.get(path)
        assert response.status_code == 404, path
        error = response.json()["error"]
        assert error["code"] == "not_found"
        assert error["message"] == "the chat widget is not available on this gateway"
        assert error["request_id"] == response.headers["x-request-id"]
    assert (await gateway.get("/healthz")).status_code == 200


async def test_a_bundle_is_read_once_at_start(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "widget.js"
    path.write_bytes(b"console.log('one')")
    gateway = client(path)
    path.write_bytes(b"console.log('two')")
    assert (await gateway.get("/widget.js")).content == b"console.log('one')"
    manifest = (await gateway.get("/widget.json")).json()
    digest = hashlib.sha384(b"console.log('one')").digest()
    assert manifest == {
        "version": digest.hex()[:16],
        "url": f"/widget/{digest.hex()[:16]}/widget.js",
        "integrity": "sha384-" + base64.b64encode(digest).decode(),
        "bytes": 18,
        "gzip_bytes": manifest["gzip_bytes"],
    }
    head = await gateway.head(manifest["url"])
    assert head.status_code == 200 and head.headers["etag"] == f'"{digest.hex()[:16]}-gz"'
