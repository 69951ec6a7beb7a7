"""Start the runtime: `python -m runtime` (uvicorn on uvloop, RUNTIME_WORKERS processes)."""

from __future__ import annotations

import os
import sys
from typing import Any, cast

from starlette.applications import Starlette
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from runtime.app import create_app
from runtime.config import ConfigError, RuntimeConfig, apply_engine_environment
from runtime.link import DRAIN


class LinkWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, but a graceful shutdown drains a link.

    On SIGTERM uvicorn calls `shutdown()` on every connection, and the base class closes an
    open WebSocket at once with 1012: every run in flight on a link would die. This one hands
    the app a drain message instead; the link sends GOAWAY, lets its runs finish and closes
    with 1001 (runtime.link), and uvicorn waits for that up to
    `timeout_graceful_shutdown`. It reads the base class's `queue`, `handshake_complete` and
    `close_sent` (uvicorn 0.54, pinned); tests/runtime/test_link.py fails if they change.
    """

    def shutdown(self) -> None:
        if self.handshake_complete and not self.close_sent:
            # Not an ASGI message: only runtime.link, the one WebSocket route, understands it.
            self.queue.put_nowait(cast(Any, {"type": DRAIN}))
            return
        super().shutdown()


def app_from_env() -> Starlette:
    """The app factory each uvicorn worker calls."""
    return create_app(RuntimeConfig.from_env())


def main() -> None:
    import uvicorn

    try:
        config = RuntimeConfig.from_env()
    except ConfigError as exc:
        sys.exit(f"runtime: {exc}")
    # lfx reads its allowlists from the environment; set them before any worker imports it.
    apply_engine_environment(config, os.environ)
    options = {
        "host": config.host, "port": config.port, "loop": "uvloop", "http": "httptools",
        "log_level": config.log_level, "access_log": False, "timeout_graceful_shutdown": 10,
        # Link frames are small and on the local network: compressing each costs CPU for little.
        "ws": LinkWebSocketProtocol, "ws_per_message_deflate": False,
    }
    if config.workers == 1:
        uvicorn.run(create_app(config), **options)  # type: ignore[arg-type]
    else:
        uvicorn.run("runtime.server:app_from_env", factory=True, workers=config.workers,
                    **options)  # type: ignore[arg-type]
