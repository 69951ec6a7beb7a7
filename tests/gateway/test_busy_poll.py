"""Busy polling: a kick keeps the worker's loop turning (and spending CPU) for the window after
the latest kick, and then the loop sleeps again."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from gateway import busy_poll
from gateway.busy_poll import BusyPoll


async def cpu_over(seconds: float) -> float:
    """The CPU this process spends while the loop waits `seconds`."""
    started = time.process_time()
    await asyncio.sleep(seconds)
    return time.process_time() - started


async def test_a_kick_keeps_the_loop_polling_through_its_window_then_it_sleeps() -> None:
    poll = BusyPoll(asyncio.get_running_loop(), 0.4)
    idle = await cpu_over(0.3)
    poll.kick()
    assert poll.polling
    busy = await cpu_over(0.3)  # inside the window: the loop turns instead of sleeping
    assert poll.polling
    assert busy > 0.1 and busy > 5 * idle, (busy, idle)
    deadline = time.monotonic() + 10
    while poll.polling and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not poll.polling
    assert await cpu_over(0.3) < busy / 2  # asleep again


async def test_each_kick_moves_the_end_of_the_window() -> None:
    poll = BusyPoll(asyncio.get_running_loop(), 0.2)
    poll.kick()
    kicked = time.monotonic()
    for _ in range(5):
        await asyncio.sleep(0.1)
        assert poll.polling
        poll.kick()
    last_kick = time.monotonic()
    deadline = last_kick + 10
    while poll.polling and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    stopped = time.monotonic()
    assert not poll.polling
    assert stopped - last_kick >= 0.2 and stopped - kicked >= 0.7


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s must be positive, got 0"):
        BusyPoll(asyncio.new_event_loop(), 0)


async def test_each_polling_turn_yields_the_core_to_the_workers_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop drops and retakes the GIL on every turn; a thread on the same core waiting for
    it (the spool's fsync) runs in between only if the turn gives up the core."""
    yields = 0
    real_yield = os.sched_yield

    def counted() -> None:
        nonlocal yields
        yields += 1
        real_yield()

    monkeypatch.setattr(busy_poll.os, "sched_yield", counted)
    poll = BusyPoll(asyncio.get_running_loop(), 0.05)
    poll.kick()
    while poll.polling:
        await asyncio.sleep(0.01)
    assert yields > 10
    turned = yields
    await asyncio.sleep(0.05)
    assert yields == turned  # asleep: no turns, no yields
