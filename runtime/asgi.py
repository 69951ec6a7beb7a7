"""Small pieces of raw ASGI shared by the runtime's servers."""

from __future__ import annotations

from starlette.types import Receive


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client goes away; uvicorn's `send` stays silent about it."""
    while (await receive())["type"] != "http.disconnect":
        pass
