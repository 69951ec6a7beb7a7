"""Chatting through the widget in Chromium, against the real gateway and runtime."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis
from playwright.async_api import Response, expect

from cmp.apikeys import revoke_key
from cmp.registry import BucketLimit, Limits
from devstack.stack import Stack
from tests.e2e.conftest import auth
from tests.widget.conftest import (
    MakeSite,
    Site,
    Tab,
    bot_bodies,
    chat_requests,
    events,
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
