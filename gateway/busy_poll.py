"""Busy polling: once a chat starts, the worker keeps polling its sockets for a window instead
of going to sleep in epoll between events. Off unless GATEWAY_BUSY_POLL_US is set.

A chat wakes a sleeping worker several times: for the request, for the limiter's reply, for the
runtime's answer, and soon after for the next request. On a virtual machine each sleep and
wake-up costs more than the work between them (the idle core halts and exits to the host, an
interrupt wakes it, the scheduler switches back in, the caches are cold), and that cost is
paid on the chat's critical path: at 2,000 chats/s a sleeping worker spends about twice the CPU
per chat that it spends when saturated. While the window is open a callback posts itself again
on every turn of the loop, so the loop polls with a zero timeout and takes each reply the
moment it lands. Nothing waits behind that callback: every turn still runs every ready
callback and every ready socket. Each turn also yields the core: the loop drops the GIL and
takes it back on every turn, and a thread of the worker waiting for it on the same core (the
spool's fsync) would otherwise rarely run in between, and wait for the scheduler's next tick
(a probe thread's wait at p99 went from 2.7 ms to 0.5 with the yield).

The price is CPU. A worker whose chats come closer together than the window never sleeps and
shows as fully busy, though what it can serve is unchanged; with traffic once a second it
spends one window a second. Give the worker a core of its own before turning this on: on a
shared core it takes that time from its neighbours (the runtime, Redis, other workers).
"""

from __future__ import annotations

import asyncio
import os
import time


class BusyPoll:
    """`kick()` keeps the loop polling until `window_s` after the latest kick."""

    def __init__(self, loop: asyncio.AbstractEventLoop, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self._loop = loop
        self._window = window_s
        self._until = 0.0
        self.polling = False

    def kick(self) -> None:
        self._until = time.monotonic() + self._window
        if not self.polling:
            self.polling = True
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        if time.monotonic() < self._until:
            os.sched_yield()  # without the GIL: a thread waiting for it takes it now
            self._loop.call_soon(self._turn)
        else:
            self.polling = False
