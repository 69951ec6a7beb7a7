"""The event manager of one run: model tokens straight into the run's queue, nothing else."""

from __future__ import annotations

import asyncio
from typing import Any

from lfx.events.event_manager import EventManager


class TokenEvents(EventManager):
    """lfx components emit through this; every event but `token` is dropped unserialised."""

    def __init__(self, queue: asyncio.Queue[str]) -> None:
        super().__init__(None)  # type: ignore[no-untyped-call]
        self._tokens = queue
        self._loop_of_run = asyncio.get_running_loop()
        self.register_event("on_token", "token", callback=self._on_token)

    def push_token(self, text: str) -> None:
        if text:
            self._tokens.put_nowait(text)

    def _on_token(self, *, manager: Any, event_type: str, data: Any) -> None:
        text = data.get("chunk") if isinstance(data, dict) else None
        if not isinstance(text, str) or not text:
            return
        # Agents call on_token from worker threads; asyncio.Queue is not thread-safe.
        try:
            in_loop = asyncio.get_running_loop() is self._loop_of_run
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._tokens.put_nowait(text)
        else:
            self._loop_of_run.call_soon_threadsafe(self._tokens.put_nowait, text)
