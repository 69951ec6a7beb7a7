"""The built file itself, and how the gateway delivers it: caching, versions, SRI."""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from devstack.stack import Stack
from tests.widget.conftest import Site, Tab, events, quote, wait_event

BUDGET = 12 * 1024


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def built(bundle: Path) -> bytes:
    return bundle.read_bytes()


def test_the_bundle_is_small_and_free_of_eval_and_markup_sinks(bundle: Path) -> None:
    body = bundle.read_bytes()
    assert len(gzip.compress(body, compresslevel=9)) <= BUDGET
    text = body.decode()
    for forbidden in (r"\beval\(", r"\bnew Function\b", r"\bFunction\(", r"\.innerHTML\b",
                      r"\.outerHTML\b", r"insertAdjacentHTML", r"document\.write",
                      r"setAttribute\(\s*['\"]style", r"setTimeout\(\s*['\"`]"):
        assert not re.search(forbidden, text), forbidden
    assert text.startswith("(()=>{") and text.rstrip().endswith("})();")  # one minified IIFE


async def test_widget_js_is_served_with_a_short_cache_and_an_etag(
    gateway: httpx.AsyncClient, built: bytes
) -> None:
    plain = await gateway.get("/widget.js", headers={"accept-encoding": "identity"})
    assert plain.status_code == 200
    assert plain.content == built
    assert plain.headers["content-type"] == "text/javascript; charset=utf-8"
    assert plain.headers["cache-control"] == "public, max-age=300"
    assert plain.headers["access-control-allow-origin"] == "*"
    assert plain.headers["x-content-type-options"] == "nosniff"
    etag = plain.headers["etag"]
    again = await gateway.get("/widget.js", headers={"if-none-match": etag,
                                                     "accept-encoding": "identity"})
    assert again.status_code == 304 and again.content == b""
    squeezed = await gateway.get("/widget.js", headers={"accept-encoding": "gzip, br"})
    assert squeezed.headers["content-encoding"] == "gzip"
    assert squeezed.content == built  # httpx decodes it
    assert int(squeezed.headers["content-length"]) <= BUDGET
    assert squeezed.headers["etag"] != etag
    assert "Accept-Encoding" in squeezed.headers["vary"]


async def test_the_versioned_path_is_immutable_and_its_hash_published(
    gateway: httpx.AsyncClient, built: bytes
) -> None:
    manifest = (await gateway.get("/widget.json")).json()
    digest = hashlib.sha384(built).digest()
    assert manifest["integrity"] == "sha384-" + base64.b64encode(digest).decode()
    assert manifest["url"] == f"/widget/{digest.hex()[:16]}/widget.js"
    pinned = await gateway.get(manifest["url"])
    assert pinned.status_code == 200 and pinned.content == built
    assert pinned.headers["cache-control"] == "public, max-age=31536000, immutable"
    stale = await gateway.get("/widget/0123456789abcdef/widget.js")
    assert stale.status_code == 404
    assert stale.json()["error"]["code"] == "not_found"
    assert "/widget.json" in stale.json()["error"]["message"]


async def test_a_page_pinning_the_bundle_with_sri_loads_it_and_a_wrong_hash_does_not(
    gateway: httpx.AsyncClient, site: Site, tab: Tab
) -> None:
    manifest = (await gateway.get("/widget.json")).json()
    tenant = site.tenant

    def pinned(integrity: str) -> bytes:
        return site.html(script=(
            f'<script src="{site.gateway_url}{manifest["url"]}" integrity="{integrity}"'
            f' crossorigin="anonymous" data-agent="{quote(tenant.agent_id)}"'
            f' data-key="{quote(tenant.publishable_key)}" async></script>'))

    await tab.page.goto(site.add("/pinned", pinned(manifest["integrity"])))
    await wait_event(tab.page, "ready")
    assert (await events(tab.page, "ready"))[0]["agent"] == tenant.agent_id
    wrong = "sha384-" + base64.b64encode(hashlib.sha384(b"tampered").digest()).decode()
    await tab.page.goto(site.add("/tampered", pinned(wrong)))
    await tab.page.wait_for_load_state("load")
    assert await tab.page.evaluate("typeof window.SiteKit") == "undefined"
    assert any("integrity" in line for line in tab.errors())


async def test_the_bundle_without_its_attributes_says_what_is_missing(
    site: Site, tab: Tab
) -> None:
    await tab.page.goto(site.add("/bare", site.html(
        script=f'<script src="{site.gateway_url}/widget.js"></script>')))
    await tab.page.wait_for_load_state("load")
    assert any("needs data-agent and data-key" in line for line in tab.errors())
    assert not [line for line in tab.console if line.startswith("pageerror")]
    assert await tab.page.locator("sitekit-chat").count() == 0
