"""The shadow root keeps host page and widget apart, both ways, and a strict CSP is no bar."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageChops, ImageStat
from playwright.async_api import Page

from devstack.demo_page import strict_csp
from tests.widget.conftest import Site, Tab, events, open_chat, send, wait_event

# Everything a careless or hostile stylesheet might throw at an embedded widget.
HOSTILE_CSS = """<style>
*, *::before, *::after { all: unset !important; font: italic 40px/3 serif !important;
  color: red !important; background: yellow !important; border: 4px dashed lime !important;
  padding: 12px !important; margin: 9px !important; box-sizing: content-box !important;
  letter-spacing: 3px !important; text-transform: uppercase !important; }
html { font-size: 40px !important; color-scheme: dark !important; }
body { direction: rtl !important; cursor: wait !important; }
sitekit-chat { display: block !important; position: static !important; width: 10px !important;
  height: 10px !important; opacity: .2 !important; transform: rotate(10deg) !important;
  filter: blur(3px) !important; visibility: hidden !important; --sk-accent: red !important; }
button, textarea, section { display: none !important; }
div, header, form { display: inline !important; }
:root { --sk-accent: red; --sk-on: red; }
</style>"""


async def shot(page: Page, box: dict[str, float], inset: float) -> Image.Image:
    clip = {"x": box["x"] + inset, "y": box["y"] + inset,
            "width": box["width"] - 2 * inset, "height": box["height"] - 2 * inset}
    png = await page.screenshot(clip=clip, animations="disabled", caret="hide")
    return Image.open(io.BytesIO(png)).convert("RGB")


async def widget_boxes(page: Page) -> dict[str, Any]:
    boxes: dict[str, Any] = await page.evaluate("""() => {
      const root = document.querySelector('sitekit-chat').shadowRoot;
      const rect = (el) => { const r = el.getBoundingClientRect();
        return { x: r.x, y: r.y, width: r.width, height: r.height }; };
      return { panel: rect(root.querySelector('.panel')),
               launcher: rect(root.querySelector('.launcher')) };
    }""")
    return boxes


def difference(a: Image.Image, b: Image.Image) -> tuple[float, float]:
    """The mean difference per channel (0-255) and the share of pixels that differ."""
    assert a.size == b.size
    diff = ImageChops.difference(a, b)
    mean = sum(ImageStat.Stat(diff).mean) / 3
    changed = sum(diff.convert("L").histogram()[25:])
    return mean, changed / (a.size[0] * a.size[1])


async def test_hostile_host_css_leaves_the_widget_unchanged(site: Site, tab: Tab) -> None:
    page = tab.page
    pictures = []
    for path, head in (("/plain", ""), ("/hostile", HOSTILE_CSS)):
        await page.goto(site.add(path, site.html(head=head)))
        await open_chat(page)
        await send(page, "Which tent for two? #tokens=12")
        await wait_event(page, "answer")
        await page.evaluate("document.activeElement.blur()")
        boxes = await widget_boxes(page)
        # Inside the rounded corners only: around them the page's own background shows.
        pictures.append((boxes, await shot(page, boxes["panel"], 12),
                         await shot(page, boxes["launcher"], 10)))
        await page.evaluate("localStorage.clear()")
    (plain_boxes, plain_panel, plain_launcher), (boxes, panel, launcher) = pictures
    assert boxes == plain_boxes
    for before, after in ((plain_panel, panel), (plain_launcher, launcher)):
        mean, changed = difference(before, after)
        assert mean < 1.0 and changed < 0.005, (mean, changed)


async def test_the_widget_leaves_the_host_page_unchanged(site: Site, tab: Tab) -> None:
    page = tab.page
    probe = """() => ({
      sheets: document.styleSheets.length, adopted: document.adoptedStyleSheets.length,
      body: getComputedStyle(document.body).cssText || [...getComputedStyle(document.body)]
        .map((p) => p + ':' + getComputedStyle(document.body).getPropertyValue(p)).join(';'),
      h1: [...getComputedStyle(document.querySelector('h1'))]
        .map((p) => p + ':' + getComputedStyle(document.querySelector('h1')).getPropertyValue(p))
        .join(';'),
      nodes: [...document.body.children].map((el) => el.tagName).join(','),
    })"""
    await page.goto(site.add("/no-widget", site.html(script="")))
    without = await page.evaluate(probe)
    page_alone = await page.screenshot(clip={"x": 0, "y": 0, "width": 600, "height": 300})
    await page.goto(site.url)
    await open_chat(page)
    with_widget = await page.evaluate(probe)
    assert with_widget["sheets"] == without["sheets"] and with_widget["adopted"] == 0
    assert with_widget["body"] == without["body"] and with_widget["h1"] == without["h1"]
    assert with_widget["nodes"] == without["nodes"] + ",SCRIPT,SITEKIT-CHAT"
    page_with = await page.screenshot(clip={"x": 0, "y": 0, "width": 600, "height": 300})
    mean, changed = difference(Image.open(io.BytesIO(page_alone)).convert("RGB"),
                               Image.open(io.BytesIO(page_with)).convert("RGB"))
    assert mean < 0.5 and changed < 0.001


async def test_a_page_with_a_strict_csp_chats(site: Site, tab: Tab) -> None:
    page = tab.page
    url = site.add("/strict", site.html(),
                   {"Content-Security-Policy": strict_csp(site.gateway_url)})
    response = await page.goto(url)
    assert response is not None and "require-trusted-types-for" in (
        await response.header_value("content-security-policy") or "")
    await open_chat(page)
    await send(page, "Do you sell **maps**? #tokens=6")
    await wait_event(page, "answer")
    assert (await events(page, "answer"))[0]["text"]
    assert await page.locator("sitekit-chat .msg.user strong").count() == 1
    colour = await page.locator("sitekit-chat .launcher").evaluate(
        "(el) => getComputedStyle(el).backgroundColor")
    assert colour == "rgb(37, 99, 235)"  # the stylesheet applied
    assert await page.evaluate("window.__csp") == []
    assert not [line for line in tab.console if "Content Security Policy" in line]
    assert tab.errors() == []
