"""Chatting through the widget in Chromium, against the real gateway and runtime."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis
from playwright.async_api import Request, Response, expect

from cmp.apikeys import revoke_key
from cmp.registry import BucketLimit, Limits, load_instance, publish_entry, save_instance
from devstack.stack import Stack
from tests.e2e.conftest import auth
from tests.widget.conftest import (
    WAIT_MS,
    MakeSite,
    Site,
    Tab,
    bot_bodies,
    events,
    launcher,
    open_chat,
    send,
    status,
    textbox,
    wait_event,
)

# Records the text of the answer being streamed each time the panel changes, and whether the
# widget had already announced the end of the answer.
WATCH_ANSWER = """() => {
  const root = document.querySelector('sitekit-chat').shadowRoot;
  const before = root.querySelectorAll('.msg.bot .body').length;
  window.__seen = [];
  new MutationObserver(() => {
    const body = root.querySelectorAll('.msg.bot .body')[before];
    const text = body ? body.textContent : '';
    const ended = window.__sitekit.some((e) => e.type === 'answer');
    const last = window.__seen[window.__seen.length - 1];
    if (text && (!last || last.text !== text)) window.__seen.push({ text, ended });
  }).observe(root.querySelector('.log'), { subtree: true, childList: true, characterData: true });
}"""


async def direct_answer(stack: Stack, site: Site, message: str) -> str:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
        response = await client.post(f"/v1/agents/{site.tenant.agent_id}/chat",
                                     json={"message": message},
                                     headers=auth(site.tenant.secret_key))
    response.raise_for_status()
    text: str = response.json()["text"]
    return text


def chat_requests(tab: Tab) -> list[Request]:
    found: list[Request] = []
    tab.page.on("request", lambda r: found.append(r) if r.url.endswith("/chat") else None)
    return found


async def test_tokens_appear_in_order_before_the_answer_ends(
    stack: Stack, site: Site, tab: Tab
) -> None:
    page = tab.page
    message = "Which boots for hiking? #slow #tokens=4"
    await page.goto(site.url)
    await open_chat(page)
    await page.evaluate(WATCH_ANSWER)
    await send(page, message)
    await wait_event(page, "answer")
    seen = await page.evaluate("window.__seen")
    expected = await direct_answer(stack, site, message)
    texts = [s["text"] for s in seen]
    assert texts[-1] == expected
    assert (await events(page, "answer"))[0]["text"] == expected
    assert len(texts) == 4, texts  # one token a second: each showed on its own
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False)), texts
    assert not any(s["ended"] for s in seen[:-1]), seen
    await expect(page.locator("sitekit-chat .msg.user")).to_have_text(re.compile("boots"))
    assert tab.errors() == []


async def test_a_page_on_an_origin_not_listed_gets_no_chat(
    site: Site, page_server: object, tab: Tab
) -> None:
    foreign = page_server()  # type: ignore[operator]
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


async def test_a_reload_keeps_the_conversation(site: Site, tab: Tab) -> None:
    page = tab.page
    requests = chat_requests(tab)
    await page.goto(site.url)
    await open_chat(page)
    await send(page, "Do you ship to Norway? #tokens=6")
    await wait_event(page, "answer")
    answer = (await events(page, "answer"))[0]["text"]
    await page.reload()
    await open_chat(page)
    await expect(page.locator("sitekit-chat .msg.user .body")).to_have_text(
        ["Do you ship to Norway? #tokens=6"])
    await expect(bot_bodies(page).last).to_have_text(answer)
    await send(page, "And to Iceland? #tokens=3")
    await wait_event(page, "answer")
    sessions = [orjson.loads(r.post_data or "")["session_id"] for r in requests]
    assert len(sessions) == 2 and sessions[0] == sessions[1]
    assert (await events(page, "answer"))[0]["session_id"] == sessions[0]


async def test_rate_limited_says_when_to_try_again(make_site: MakeSite, tab: Tab) -> None:
    site = await make_site(Limits(tenant=BucketLimit(100, 100), key=BucketLimit(0.01, 1)))
    page = tab.page
    limited: list[Response] = []
    page.on("response", lambda r: limited.append(r) if r.status == 429 else None)
    await page.goto(site.url)
    await open_chat(page)
    await send(page, "First question #tokens=3")
    await wait_event(page, "answer")
    await send(page, "Second question")
    await wait_event(page, "error")
    retry_after = int(await limited[0].header_value("retry-after") or "0")
    assert retry_after > 1
    await expect(status(page)).to_have_text(
        f"Too many messages. Try again in {retry_after} seconds.")
    assert (await events(page, "error"))[0]["kind"] == "rate_limited"
    await expect(textbox(page)).to_have_value("Second question")  # ready to send again


async def test_the_stop_button_cancels_the_answer(stack: Stack, site: Site, tab: Tab) -> None:
    page = tab.page
    stats = httpx.AsyncClient(base_url=stack.llm_url.removesuffix("/v1"), timeout=10)

    async def cancelled() -> int:
        count: int = (await stats.get("/_stats")).json()["streams_cancelled"]
        return count

    cancelled_before = await cancelled()
    await page.goto(site.url)
    await open_chat(page)
    await send(page, "Tell me everything about tents #slow #tokens=40")
    await expect(bot_bodies(page).nth(1)).not_to_be_empty()
    await page.get_by_role("button", name="Stop").click()
    await expect(status(page)).to_have_text("Stopped.")
    stopped = await bot_bodies(page).nth(1).text_content()
    answer = (await events(page, "answer"))[0]
    assert answer["stopped"] is True and answer["text"] == stopped
    await asyncio.sleep(2.5)  # the mock would have sent two more tokens by now
    assert await bot_bodies(page).nth(1).text_content() == stopped
    assert len((stopped or "").split()) < 40
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    for _ in range(100):  # the gateway hung up on the runtime, which hung up on the model
        if await cancelled() > cancelled_before:
            break
        await asyncio.sleep(0.1)
    assert await cancelled() > cancelled_before
    await stats.aclose()


async def test_after_a_network_loss_it_retries(site: Site, tab: Tab) -> None:
    page = tab.page
    await page.goto(site.url)
    await open_chat(page)
    await page.context.set_offline(True)
    await send(page, "Are you open on Sunday? #tokens=3")
    await expect(status(page)).to_have_text(
        re.compile(r"Connection lost\. Retrying in \d+ seconds"))
    await page.context.set_offline(False)
    await wait_event(page, "answer")
    assert (await events(page, "answer"))[0]["text"]
    await expect(status(page)).to_have_text("")
    assert await events(page, "error") == []


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


async def test_a_revoked_key_is_refused_in_words_without_retrying(
    site: Site, tab: Tab, db: asyncpg.Connection, stack_redis: aioredis.Redis
) -> None:
    page = tab.page
    requests = chat_requests(tab)
    await page.goto(site.url)
    await open_chat(page)
    await revoke_key(db, stack_redis, tenant_id=site.tenant.tenant_id,
                     key_id=site.tenant.publishable_key_id)
    await asyncio.sleep(1.5)  # revocations reach the gateways within a second
    await send(page, "Still there?")
    await wait_event(page, "error")
    await expect(status(page)).to_have_text("This chat is not available on this website.")
    assert (await events(page, "error"))[0]["kind"] == "refused"
    assert len(requests) == 1


async def test_with_the_runtime_down_it_retries_briefly_then_says_unavailable(
    stack: Stack, site: Site, tab: Tab
) -> None:
    page = tab.page
    requests = chat_requests(tab)
    await page.goto(site.url)
    await open_chat(page)
    stack.process("runtime").stop()  # the next test gets it back (services_up)
    await send(page, "Anyone home?")
    await expect(status(page)).to_have_text(
        re.compile(r"The assistant is busy\. Retrying in \d+ seconds"))
    await wait_event(page, "error")
    await expect(status(page)).to_have_text(
        "The assistant is unavailable right now. Please try again later.")
    assert (await events(page, "error"))[0]["kind"] == "unavailable"
    assert len(requests) == 3  # the first try and two retries
    assert await bot_bodies(page).count() == 1  # the greeting only: no empty answer
