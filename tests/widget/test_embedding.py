"""Embedding the widget: which origins get a chat, what it shows, its API, events and attributes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import asyncpg
import redis.asyncio as aioredis
from playwright.async_api import expect

from cmp.registry import load_instance, publish_entry, save_instance
from devstack.demo_page import PageServer
from tests.widget.conftest import (
    WAIT_MS,
    Site,
    Tab,
    bot_bodies,
    chat_requests,
    events,
    launcher,
    open_chat,
    send,
    textbox,
    wait_event,
)


async def test_a_page_on_an_origin_not_listed_gets_no_chat(
    site: Site, page_server: Callable[[], PageServer], tab: Tab
) -> None:
    foreign = page_server()
    foreign.pages["/"] = site.server.pages["/"]
    requests: list[str] = []
    tab.page.on("request", lambda r: requests.append(r.url))
    await tab.page.goto(f"{foreign.origin}/")
    await wait_event(tab.page, "error")
    assert any(f"origin {foreign.origin} is not allowed" in line for line in tab.errors())
    assert await tab.page.locator("sitekit-chat").count() == 0
    assert not [url for url in requests if "/v1/agents/" in url]
    # The gateway refuses this origin too, whatever a page's script does.
    refused = await tab.page.evaluate("""async ([url, key]) => {
      try {
        const r = await fetch(url, { method: 'POST', body: '{"message": "hi"}',
          headers: { Authorization: 'Bearer ' + key, 'Content-Type': 'application/json' } });
        return 'answered ' + r.status;
      } catch (err) { return 'refused'; }
    }""", [f"{site.gateway_url}/v1/agents/{site.tenant.agent_id}/chat",
           site.tenant.publishable_key])
    assert refused == "refused"


async def test_an_origin_the_agent_dropped_gets_no_chat(
    site: Site, tab: Tab, db: asyncpg.Connection, stack_redis: aioredis.Redis
) -> None:
    instance = await load_instance(db, site.tenant.agent_id, site.tenant.tenant_id)
    fields = {name: getattr(instance, name) for name in type(instance).__slots__}
    moved = await save_instance(db, type(instance)(**{
        **fields, "allowed_origins": ("https://elsewhere.example",)}))
    await publish_entry(stack_redis, moved)
    await asyncio.sleep(1.0)  # registry changes reach the gateways within a second
    await tab.page.goto(site.url)
    await wait_event(tab.page, "error")
    assert any(f"could not load agent {site.tenant.agent_id}" in line
               and site.server.origin in line for line in tab.errors())
    assert await tab.page.locator("sitekit-chat").count() == 0


async def test_text_is_shown_as_text_with_light_formatting(site: Site, tab: Tab) -> None:
    page = tab.page
    hostile = ('<img src=x onerror="window.__xss=1"> **bold** `code` *soft* '
               "https://example.com/a?b=1")
    await page.goto(site.url)
    await tab.page.evaluate("""([agent, text]) => localStorage.setItem('sitekit:' + agent,
        JSON.stringify({ session: 'restored', messages: [{ role: 'bot', text }] }))""",
                            [site.tenant.agent_id, '<script>window.__xss=2</script>\n- one\n- two'])
    await page.reload()
    await open_chat(page)
    await send(page, hostile)
    await wait_event(page, "answer")
    shadow = page.locator("sitekit-chat")
    user = shadow.locator(".msg.user .body")
    await expect(user).to_contain_text('<img src=x onerror="window.__xss=1">')
    await expect(user.locator("strong")).to_have_text("bold")
    await expect(user.locator("code")).to_have_text("code")
    await expect(user.locator("em")).to_have_text("soft")
    link = user.locator("a")
    await expect(link).to_have_attribute("href", "https://example.com/a?b=1")
    await expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    restored = bot_bodies(page).nth(1)
    await expect(restored).to_contain_text("<script>window.__xss=2</script>")
    await expect(restored.locator("li")).to_have_text(["one", "two"])
    assert await shadow.locator("img, script").count() == 0
    assert await page.evaluate("window.__xss") is None


async def test_open_close_destroy_and_cancelable_events(site: Site, tab: Tab) -> None:
    page = tab.page
    requests = chat_requests(tab)
    await page.goto(site.url)
    await wait_event(page, "ready")
    await page.evaluate("""() => {
      window.__veto = true;
      document.addEventListener('sitekit:open', (e) => { if (window.__veto) e.preventDefault(); });
      document.addEventListener('sitekit:send', (e) => e.preventDefault());
    }""")
    assert await page.evaluate("SiteKit.open(), SiteKit.isOpen") is False
    await page.evaluate("window.__veto = false")
    assert await page.evaluate("SiteKit.open(), SiteKit.isOpen") is True
    await expect(textbox(page)).to_be_focused()
    await send(page, "This one the host vetoes")
    await expect(page.locator("sitekit-chat .msg.user")).to_have_count(0)
    assert requests == []
    assert await page.evaluate("SiteKit.close(), SiteKit.isOpen") is False
    assert [e for e in await page.evaluate("window.__sitekit.map((e) => e.type)")
            if e != "error"] == ["ready", "open", "open", "send", "close"]  # one vetoed

    # destroy(): every node and every listener of the widget is gone.
    await page.evaluate("""() => {
      const root = document.querySelector('sitekit-chat').shadowRoot;
      window.__kept = [...root.querySelectorAll('button, textarea, form, section')];
    }""")
    cdp = await page.context.new_cdp_session(page)

    async def listeners() -> int:
        count = 0
        for i in range(await page.evaluate("window.__kept.length")):
            found = await cdp.send("Runtime.evaluate", {"expression": f"window.__kept[{i}]"})
            result = await cdp.send("DOMDebugger.getEventListeners",
                                    {"objectId": found["result"]["objectId"]})
            count += len(result["listeners"])
        return count

    assert await listeners() >= 6
    await page.evaluate("SiteKit.destroy()")
    assert await listeners() == 0
    assert await page.locator("sitekit-chat").count() == 0
    assert await page.evaluate("typeof window.SiteKit") == "undefined"
    assert (await events(page, "destroy"))[0]["agent"] == site.tenant.agent_id
    await launcher(page).wait_for(state="detached", timeout=WAIT_MS)


async def test_data_attributes_set_position_colour_language_and_open(
    site: Site, tab: Tab
) -> None:
    page = tab.page
    url = site.add("/custom", site.html(position="bottom-left", accent="#0f766e", locale="de",
                                        open=""))
    await page.goto(url)
    await wait_event(page, "open")
    close = page.get_by_role("button", name="Chat schließen")
    await expect(close).to_be_visible()
    await expect(page.get_by_role("dialog")).to_have_attribute("lang", "de")
    box = await page.get_by_role("button", name=re.compile("^Chat mit")).bounding_box()
    assert box is not None and box["x"] < 100
    colour = await page.get_by_role("button", name=re.compile("^Chat mit")).evaluate(
        "(el) => getComputedStyle(el).backgroundColor")
    assert colour == "rgb(15, 118, 110)"
    # Opened on load without taking the focus from the host page.
    assert await page.evaluate("document.activeElement === document.body")
