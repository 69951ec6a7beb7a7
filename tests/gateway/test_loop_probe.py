"""The loop probe: how late the event loop runs a callback, and where it was meanwhile."""

from __future__ import annotations

import asyncio
import sys
import time

from gateway.loop_probe import IN_LOOP, LoopProbe


def hold_the_loop(seconds: float) -> None:
    """Python code that keeps the loop thread busy, as a slow request handler would."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def test_the_probe_says_how_late_the_loop_was_and_where() -> None:
    switch_interval = sys.getswitchinterval()
    probe = LoopProbe(asyncio.get_running_loop(), interval_s=0.001, late_s=0.0005)
    probe.start()
    await asyncio.sleep(0.05)  # an idle loop: callbacks run at once
    for _ in range(5):
        hold_the_loop(0.01)
        await asyncio.sleep(0.005)
    probe.stop()
    assert sys.getswitchinterval() == switch_interval

    report = probe.report()
    assert report["probes"] > 20
    assert report["delay_ms"]["p50"] < report["delay_ms"]["max"]
    assert report["delay_ms"]["max"] >= 5  # a probe posted during a 10 ms hold waited for it
    busy = [line for line in report["late_stacks"] if "hold_the_loop (" in line]
    assert busy, report["late_stacks"]
    count, _, stack = busy[0].partition("  ")
    assert int(count) >= 5 and "test_the_probe_says_how_late_the_loop_was_and_where" in stack
    assert IN_LOOP not in busy[0]

