"""The page `make up` serves: the widget embedded under a strict CSP, chatting."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import pytest

from devstack.demo_page import PageServer, serve_demo
from devstack.procs import free_port
from devstack.stack import Stack
from tests.widget.conftest import MakeTenant, Tab, events, open_chat, send, wait_event


@pytest.fixture
def servers() -> Iterator[list[PageServer]]:
    started: list[PageServer] = []
    yield started
    for server in started:
        server.stop()


async def test_the_demo_page_chats_under_its_csp(
    stack: Stack, make_tenant: MakeTenant, tab: Tab, servers: list[PageServer]
) -> None:
    tenant = await make_tenant(origin=f"http://127.0.0.1:{free_port()}")
    servers.append(serve_demo(stack.gateway_url, {**asdict(tenant), "name": "Acme Outdoor"}))
    response = await tab.page.goto(tenant.allowed_origin + "/")
    assert response is not None
    assert "script-src " + stack.gateway_url in (
        await response.header_value("content-security-policy") or "")
    await open_chat(tab.page)
    await send(tab.page, "Hello from the demo #tokens=5")
    await wait_event(tab.page, "answer")
    assert (await events(tab.page, "answer"))[0]["text"]
    assert await tab.page.evaluate("window.__csp") == []
    assert tab.errors() == []
