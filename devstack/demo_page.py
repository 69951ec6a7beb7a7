"""A buyer's page with the chat widget embedded, served on the demo tenant's allowed origin so
`make up` shows the widget as a visitor sees it. The page runs under a strict
Content-Security-Policy, as a careful buyer's would. The widget's browser tests serve their host
pages with the same `PageServer`."""

from __future__ import annotations

import html
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HTML = "text/html; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Page:
    body: bytes
    content_type: str = HTML
    headers: Mapping[str, str] = field(default_factory=dict)


class PageServer:
    """Serves fixed pages by path on 127.0.0.1:`port`; anything else is a 404."""

    def __init__(self, port: int, pages: Mapping[str, Page] | None = None) -> None:
        self.port = port
        self.pages: dict[str, Page] = dict(pages or {})
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                page = pages.get(urlsplit(self.path).path)
                if page is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", page.content_type)
                self.send_header("Content-Length", str(len(page.body)))
                self.send_header("Cache-Control", "no-store")
                for name, value in page.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(page.body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def widget_script(gateway_url: str, agent_id: str, publishable_key: str, **data: str) -> str:
    """The embedding snippet: `data` adds data-* attributes (position="bottom-left", ...)."""
    attributes = {"agent": agent_id, "key": publishable_key, **data}
    rendered = " ".join(
        f'data-{name.replace("_", "-")}="{html.escape(value)}"'
        for name, value in attributes.items()
    )
    return f'<script src="{html.escape(gateway_url)}/widget.js" {rendered} async></script>'


def strict_csp(gateway_url: str) -> str:
    return (
        f"default-src 'none'; script-src {gateway_url}; connect-src {gateway_url}; "
        "style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'; require-trusted-types-for 'script'"
    )


_DEMO_CSS = b"""body{margin:0;font:16px/1.5 Georgia,serif;color:#222;background:#f7f5f0}
main{max-width:720px;margin:0 auto;padding:48px 24px}
h1{font-size:40px;margin:0 0 8px}
code{background:#ece8df;padding:2px 4px}
pre{white-space:pre-wrap;word-break:break-all}
"""


def demo_pages(gateway_url: str, tenant: Mapping[str, Any]) -> dict[str, Page]:
    name = html.escape(str(tenant.get("name", "Demo shop")))
    script = widget_script(gateway_url, tenant["agent_id"], tenant["publishable_key"])
    body = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name}: Site Kit demo</title>
<link rel="stylesheet" href="/demo.css">
</head>
<body>
<main>
<h1>{name}</h1>
<p>This page stands for a buyer's website. The chat button in the corner is the Site Kit
widget, embedded with one script tag, talking to the gateway at
<code>{html.escape(gateway_url)}</code>. The page is served with a strict
Content-Security-Policy.</p>
<pre><code>{html.escape(script)}</code></pre>
</main>
{script}
</body>
</html>
"""
    return {
        "/": Page(body.encode(), headers={"Content-Security-Policy": strict_csp(gateway_url)}),
        "/demo.css": Page(_DEMO_CSS, content_type="text/css; charset=utf-8"),
        "/favicon.ico": Page(b"", content_type="image/x-icon"),
    }


def serve_demo(gateway_url: str, tenant: Mapping[str, Any]) -> PageServer:
    """Start the demo page on the tenant's allowed origin (an http://127.0.0.1:PORT)."""
    port = urlsplit(str(tenant["allowed_origin"])).port
    if port is None:
        raise ValueError(f"the demo origin {tenant['allowed_origin']} names no port")
    server = PageServer(port, demo_pages(gateway_url, tenant))
    server.start()
    return server
