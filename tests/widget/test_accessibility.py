"""axe-core finds nothing, the widget works from the keyboard, and on a phone's viewport."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Page, expect

from tests.widget.conftest import (
    AXE,
    NewTab,
    Site,
    Tab,
    launcher,
    open_chat,
    send,
    textbox,
    wait_event,
)


async def axe_violations(page: Page) -> list[dict[str, Any]]:
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.add_script_tag(path=str(AXE))
    result: list[dict[str, Any]] = await page.evaluate("""async () => {
      const { violations } = await axe.run(document, { resultTypes: ['violations'] });
      return violations.map((v) => ({ id: v.id, help: v.help,
        nodes: v.nodes.map((n) => n.target.join(' ') + ': ' + n.failureSummary) }));
    }""")
    return result


async def test_axe_finds_no_violations_closed_open_and_chatting(site: Site, tab: Tab) -> None:
    page = tab.page
    await page.goto(site.url)
    await wait_event(page, "ready")
    assert await axe_violations(page) == []
    await open_chat(page)
    assert await axe_violations(page) == []
    await send(page, "What **sizes** do you have? #tokens=8")
    await wait_event(page, "answer")
    assert await page.locator("sitekit-chat .msg").count() == 3
    assert await axe_violations(page) == []


async def test_keyboard_only(site: Site, tab: Tab) -> None:
    page = tab.page
    await page.goto(site.url)
    await wait_event(page, "ready")
    await page.keyboard.press("Tab")  # the page has nothing else to focus
    await expect(launcher(page)).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(textbox(page)).to_be_focused()
    await expect(launcher(page)).to_have_attribute("aria-expanded", "true")
    await page.keyboard.type("Hello from the keyboard #tokens=3")
    await page.keyboard.press("Enter")
    await wait_event(page, "answer")
    log = page.get_by_role("log")
    await expect(log).to_have_attribute("aria-live", "polite")
    await expect(log).to_have_attribute("aria-busy", "false")
    await expect(page.get_by_role("dialog")).to_have_accessible_name("Test shop assistant")
    await page.keyboard.press("Escape")
    await expect(page.get_by_role("dialog")).to_be_hidden()
    await expect(launcher(page)).to_be_focused()
    await expect(launcher(page)).to_have_attribute("aria-expanded", "false")


async def test_the_streamed_answer_is_in_a_polite_live_region_marked_busy_meanwhile(
    site: Site, tab: Tab
) -> None:
    page = tab.page
    await page.goto(site.url)
    await open_chat(page)
    await send(page, "Slowly please #slow #tokens=3")
    log = page.get_by_role("log")
    await expect(log).to_have_attribute("aria-busy", "true")
    await expect(page.get_by_role("status")).to_have_text("Test shop assistant is typing…")
    await wait_event(page, "answer")
    await expect(log).to_have_attribute("aria-busy", "false")
    await expect(page.get_by_role("status")).to_have_text("")


async def test_on_a_phone_the_panel_fills_the_screen(site: Site, new_tab: NewTab) -> None:
    tab = await new_tab(viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True)
    page = tab.page
    await page.goto(site.url)
    await wait_event(page, "ready")
    await launcher(page).tap()
    await expect(textbox(page)).to_be_visible()
    box = await page.get_by_role("dialog").bounding_box()
    assert box == {"x": 0, "y": 0, "width": 375, "height": 667}
    field = await textbox(page).bounding_box()
    assert field is not None and field["y"] + field["height"] <= 667
    assert await textbox(page).evaluate("(el) => getComputedStyle(el).fontSize") == "16px"
    await page.get_by_role("button", name="Close chat").tap()
    await expect(page.get_by_role("dialog")).to_be_hidden()
