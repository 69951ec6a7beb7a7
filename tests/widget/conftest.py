"""Browser tests of the chat widget: Debian's chromium driven by Playwright, host pages served on
loopback origins by devstack's PageServer, and the real stack behind them (mock LLM at the edge).
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, Request, async_playwright

from cmp.registry import DEFAULT_LIMITS, Limits
from devstack.demo_page import HTML, PageServer, widget_script
from devstack.demo_page import Page as HostPage
from devstack.procs import free_port
from devstack.stack import Stack
from gateway.config import DEFAULT_WIDGET_BUNDLE
from tests.e2e.conftest import (  # noqa: F401 - the fixtures of the end-to-end tests, reused
    MakeTenant,
    Tenant,
    db,
    make_tenant,
    services_up,
    stack_redis,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--font-render-hinting=none",
]
AXE = Path(__file__).resolve().parents[2] / "widget" / "node_modules" / "axe-core" / "axe.min.js"
WAIT_MS = 30_000  # generous: two shared cores

# Installed before any page script: records the widget's events and CSP violations.
RECORDER = """
window.__sitekit = [];
window.__csp = [];
for (const name of ['ready', 'open', 'close', 'send', 'answer', 'error', 'destroy']) {
  document.addEventListener('sitekit:' + name,
    (event) => window.__sitekit.push({ type: name, detail: event.detail }));
}
document.addEventListener('securitypolicyviolation',
  (event) => window.__csp.push(event.violatedDirective + ' ' + event.blockedURI));
"""


@pytest.fixture(scope="session")
def bundle() -> Path:
    if not DEFAULT_WIDGET_BUNDLE.exists():
        pytest.fail(f"{DEFAULT_WIDGET_BUNDLE} is missing: `make widget` builds it")
    return DEFAULT_WIDGET_BUNDLE


@pytest.fixture(scope="session")
async def browser(bundle: Path) -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():  # noqa: ASYNC240 - once per session
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        await launched.close()


@dataclass
class Tab:
    page: Page
    console: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [line for line in self.console if line.startswith(("error:", "pageerror:"))]


NewTab = Callable[..., Awaitable[Tab]]


@pytest.fixture
async def new_tab(browser: Browser) -> AsyncIterator[NewTab]:
    """Tabs in fresh browser contexts (own localStorage), closed after the test."""
    contexts = []

    async def new(**options: Any) -> Tab:
        context = await browser.new_context(
            **{"viewport": {"width": 1024, "height": 768}, "reduced_motion": "reduce", **options})
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        tab = Tab(page)
        page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: tab.console.append(f"pageerror: {error}"))
        await page.add_init_script(RECORDER)
        return tab

    yield new
    for context in contexts:
        await context.close()


@pytest.fixture
async def tab(new_tab: NewTab) -> Tab:
    return await new_tab()


@pytest.fixture
def page_server() -> Iterator[Callable[[], PageServer]]:
    started: list[PageServer] = []

    def start() -> PageServer:
        server = PageServer(free_port())
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class Site:
    """A buyer's site: a page server on the tenant's allowed origin."""

    server: PageServer
    tenant: Tenant
    gateway_url: str

    @property
    def url(self) -> str:
        return f"{self.server.origin}/"

    def html(self, *, head: str = "", script: str | None = None, **data: str) -> bytes:
        if script is None:
            script = widget_script(self.gateway_url, self.tenant.agent_id,
                                   self.tenant.publishable_key, **data)
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Test shop</title>{head}</head>
<body><main><h1>Test shop</h1><p>Boots, tents and maps.</p></main>
{script}
</body></html>""".encode()

    def add(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> str:
        self.server.pages[path] = HostPage(body, HTML, headers or {})
        return f"{self.server.origin}{path}"


MakeSite = Callable[..., Awaitable[Site]]


@pytest.fixture
def make_site(
    stack: Stack,
    make_tenant: MakeTenant,  # noqa: F811 - the imported fixture
    page_server: Callable[[], PageServer],
) -> MakeSite:
    async def make(limits: Limits = DEFAULT_LIMITS) -> Site:
        server = page_server()
        tenant = await make_tenant(limits, origin=server.origin)
        site = Site(server, tenant, stack.gateway_url)
        site.add("/", site.html())
        server.pages["/favicon.ico"] = HostPage(b"", "image/x-icon")  # no 404 in the console
        return site

    return make


@pytest.fixture
async def site(make_site: MakeSite) -> Site:
    return await make_site()


# What the tests do in a page, in the words of its user.

def launcher(page: Page) -> Locator:
    return page.get_by_role("button", name=re.compile(r"^Open chat"))


def textbox(page: Page) -> Locator:
    return page.get_by_role("textbox", name="Message")


def bot_bodies(page: Page) -> Locator:
    return page.locator("sitekit-chat .msg.bot .body")


def status(page: Page) -> Locator:
    return page.get_by_role("status")


async def wait_event(page: Page, kind: str, count: int = 1, timeout: float = WAIT_MS) -> None:
    await page.wait_for_function(
        "([kind, count]) => window.__sitekit.filter((e) => e.type === kind).length >= count",
        arg=[kind, count], timeout=timeout)


async def events(page: Page, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.evaluate(
        "(kind) => window.__sitekit.filter((e) => e.type === kind).map((e) => e.detail)", kind)
    return found


async def open_chat(page: Page) -> None:
    await wait_event(page, "ready")
    await launcher(page).click()
    await textbox(page).wait_for()


async def send(page: Page, text: str) -> None:
    await textbox(page).fill(text)
    await textbox(page).press("Enter")


def quote(text: str) -> str:
    return html.escape(text, quote=True)


def chat_requests(tab: Tab) -> list[Request]:
    found: list[Request] = []
    tab.page.on("request", lambda r: found.append(r) if r.url.endswith("/chat") else None)
    return found
