"""A diagnostic for latency tails, off unless GATEWAY_LOOP_PROBE names a file.

A thread posts a callback to the worker's event loop every `interval_s` and measures how late the
loop runs it: what a request arriving at that moment waits before the worker gets to it. While a
callback is later than `late_s`, the thread samples the loop thread's Python stack, so the report
says where the worker was when it made requests wait. A sample whose innermost frame is the one
that runs the loop means the loop was in its own C code (waiting in epoll, being woken, socket
I/O), not in Python. Probing costs a thread wake-up per interval and a shorter GIL switch interval,
so a probed worker is a little slower: `make bench` probes a worker of its own, after measuring.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections import Counter
from types import FrameType
from typing import Any

IN_LOOP = "(the event loop's own code: waiting, waking up, socket I/O)"


class LoopProbe:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, interval_s: float = 0.002,
        late_s: float = 0.0002, depth: int = 6,
    ) -> None:
        if min(interval_s, late_s) <= 0 or depth < 1:
            raise ValueError("interval_s, late_s and depth must be positive")
        self._loop, self._interval, self._late, self._depth = loop, interval_s, late_s, depth
        self._loop_thread = threading.get_ident()  # created on the loop's thread
        self._base: Any = None  # the code of the frame that runs the loop
        self._delays: list[float] = []
        self._stacks: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._switch_interval = sys.getswitchinterval()

    def start(self) -> None:
        # The sampler needs the GIL while the loop thread runs Python: let it have it sooner.
        sys.setswitchinterval(min(self._switch_interval, self._late / 2))
        self._thread = threading.Thread(target=self._run, name="loop-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        sys.setswitchinterval(self._switch_interval)

    def report(self) -> dict[str, Any]:
        delays = sorted(self._delays)
        late = self._stacks.total()

        def at(share: float) -> float:
            return round(1000 * delays[min(len(delays) - 1, int(len(delays) * share))], 3)

        return {
            "pid": os.getpid(), "interval_ms": self._interval * 1000, "late_ms": self._late * 1000,
            "probes": len(delays),
            "delay_ms": {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999),
                         "max": round(1000 * delays[-1], 3)} if delays else {},
            "late_samples": late,
            "late_in_loop_code_share": round(self._stacks[IN_LOOP] / late, 3) if late else None,
            "late_stacks": [f"{n}  {stack}" for stack, n in self._stacks.most_common(25)],
        }

    def _run(self) -> None:
        ran = threading.Event()

        def callback() -> None:
            if self._base is None:
                self._base = sys._getframe(1).f_code  # called by the loop: its caller's frame
            ran.set()

        while not self._stop.wait(self._interval):
            ran.clear()
            posted = time.perf_counter()
            try:
                self._loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop is closed
                return
            while not ran.wait(self._late):
                if self._stop.is_set():
                    return
                frame = sys._current_frames().get(self._loop_thread)
                self._stacks[self._describe(frame)] += 1
            self._delays.append(time.perf_counter() - posted)

    def _describe(self, frame: FrameType | None) -> str:
        if frame is None or frame.f_code is self._base:
            return IN_LOOP
        names: list[str] = []
        while frame is not None and len(names) < self._depth and frame.f_code is not self._base:
            code = frame.f_code
            names.append(f"{code.co_name} ({_short(code.co_filename)}:{frame.f_lineno})")
            frame = frame.f_back
        return " <- ".join(names)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/gateway/", "/ratelimit/", "/lib/python3.11/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail if marker.startswith(("site", "/lib")) else marker.strip("/") + "/" + tail
    return os.path.basename(path)
