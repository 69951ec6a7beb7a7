"""A load generator on raw asyncio protocols, so that it is never the bottleneck: keep-alive
HTTP/1.1, pre-encoded requests, callbacks instead of a coroutine per request, and just enough
parsing to find the end of a response (Content-Length, or the last chunk) and its first token.

Three drivers:
- `open_loop`: requests at a fixed rate whatever the answers do (no coordinated omission); it
  opens another connection when none is idle;
- `closed_loop`: N connections, each sending its next request as soon as the last one ended;
- `hold_streams`: many streams opened gradually and kept open.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

perf = time.perf_counter
LAST_CHUNK = b"0\r\n\r\n"
END_CHUNKED = b"\r\n0\r\n\r\n"


def http_request(path: str, headers: dict[str, str], body: bytes, method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return (head + f"content-length: {len(body)}\r\n\r\n").encode("latin-1") + body


class Client(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    __slots__ = ("sink", "transport", "buffer", "head_end", "length", "intended", "sent_at",
                 "first_at", "busy")

    def __init__(self, sink: _Driver) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.head_end = -1
        self.length = -1  # -1: chunked
        self.intended = self.sent_at = self.first_at = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.sink.lost(self)

    def send(self, payload: bytes, intended: float) -> None:
        assert self.transport is not None
        self.buffer, self.head_end, self.first_at, self.busy = b"", -1, 0.0, True
        self.intended = intended
        self.sent_at = perf()
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        now = perf()
        buffer = self.buffer = self.buffer + data
        if self.head_end < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            head = buffer[:end].lower()
            mark = head.find(b"content-length:")
            self.length = -1 if mark < 0 else int(head[mark + 15:].split(b"\r\n", 1)[0])
        if not self.first_at and buffer.find(b"event: token", self.head_end) >= 0:
            self.first_at = now
            self.sink.first_token(self, now)
        body = len(buffer) - self.head_end
        if self.length >= 0:
            complete = body >= self.length
        else:  # the last chunk; SSE data holds no CR, so this cannot be inside a chunk
            complete = body == 5 and buffer.endswith(LAST_CHUNK) or buffer.endswith(END_CHUNKED)
        if complete:
            self.busy = False
            self.sink.done(self, int(buffer[9:12]), b"event: end" in buffer, now)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(sink: _Driver, port: int, timeout: float = 5.0) -> Client:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, client = await loop.create_connection(lambda: Client(sink), "127.0.0.1", port)
    return client


def percentiles(samples: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds."""
    if len(samples) < 2:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(cuts[49] * 1000, 3), "p90_ms": round(cuts[89] * 1000, 3),
            "p99_ms": round(cuts[98] * 1000, 3), "max_ms": round(max(samples) * 1000, 3)}


@dataclass
class Tally:
    """What a driver saw: latencies to the end of each response, statuses, errors."""

    latency: list[float] = field(default_factory=list)  # from when it was due to be sent
    from_send: list[float] = field(default_factory=list)  # from when it was written
    send_lag: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def record(self, client: Client, status: int, ok: bool, now: float) -> None:
        self.statuses[status] += 1
        if status == 200 and not ok:
            self.errors["200 without an end event"] += 1
        elif status not in (200, 429):
            self.errors[f"status {status}"] += 1
        if status != 200:
            return
        self.latency.append(now - client.intended)
        self.from_send.append(now - client.sent_at)
        self.send_lag.append(client.sent_at - client.intended)
        if client.first_at:
            self.ttft.append(client.first_at - client.sent_at)

    def rps(self) -> int | None:
        return round(sum(self.statuses.values()) / self.elapsed_s) if self.elapsed_s else None

    def summary(self) -> dict[str, Any]:
        return {"requests": sum(self.statuses.values()), "rps": self.rps(),
                "latency": percentiles(self.latency),
                "latency_from_send": percentiles(self.from_send),
                "send_lag": percentiles(self.send_lag), "errors": dict(self.errors),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}}


class _Driver:
    """Shared bookkeeping: the tally, idle connections, and a wake-up when all is answered."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.tally = Tally()
        self.idle: list[Client] = []
        self.clients: list[Client] = []
        self.in_flight = 0
        self.drained = asyncio.Event()

    def first_token(self, client: Client, now: float) -> None:
        pass

    def done(self, client: Client, status: int, ok: bool, now: float) -> None:
        self.in_flight -= 1
        self.tally.record(client, status, ok, now)
        self.next(client)
        if self.in_flight == 0:
            self.drained.set()

    def lost(self, client: Client) -> None:
        if client.busy:
            client.busy = False
            self.in_flight -= 1
            self.tally.errors["connection closed mid-response"] += 1
            if self.in_flight == 0:
                self.drained.set()
        with contextlib.suppress(ValueError):
            self.idle.remove(client)

    def next(self, client: Client) -> None:
        self.idle.append(client)

    def send(self, client: Client, intended: float) -> None:
        self.in_flight += 1
        self.drained.clear()
        client.send(self.payload, intended)

    async def finish(self, timeout: float) -> Tally:
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), timeout)
        if self.in_flight:
            self.tally.errors["no answer before the deadline"] += self.in_flight
        for client in self.clients:
            client.close()
        return self.tally


class _OpenLoop(_Driver):
    def __init__(self, payload: bytes, port: int, max_connections: int) -> None:
        super().__init__(payload)
        self.port, self.max_connections = port, max_connections
        self.waiting: deque[float] = deque()  # scheduled times with no connection free yet
        self.connecting = 0

    def next(self, client: Client) -> None:
        if self.waiting:
            self.send(client, self.waiting.popleft())
        else:
            self.idle.append(client)

    def dispatch(self, intended: float) -> None:
        if self.idle:
            self.send(self.idle.pop(), intended)
            return
        self.waiting.append(intended)
        if len(self.clients) + self.connecting < self.max_connections:
            self.connecting += 1
            asyncio.get_running_loop().create_task(self.grow())

    async def grow(self) -> None:
        try:
            client = await connect(self, self.port)
            self.clients.append(client)
            self.next(client)
        except OSError as exc:
            self.tally.errors[f"connect: {exc.__class__.__name__}"] += 1
        finally:
            self.connecting -= 1


async def open_loop(port: int, payload: bytes, rate: float, seconds: float, *,
                    warm_connections: int = 32, max_connections: int = 2048) -> Tally:
    """`rate` requests per second for `seconds`, sent on schedule whatever the answers do.

    The schedule is kept by a thread that sleeps until each request is due and then wakes the
    loop. The loop's own timers have a resolution of a millisecond, so pacing with them means
    either sending late or spinning between requests; a spinning generator would take its
    whole core from the servers that share it (Redis, the upstream) and show up as their
    latency."""
    driver = _OpenLoop(payload, port, max_connections)
    for _ in range(warm_connections):
        client = await connect(driver, port)
        driver.clients.append(client)
        driver.idle.append(client)
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    start = perf() + 0.002
    finished = loop.create_future()
    sent = 0

    def dispatch_due() -> None:
        nonlocal sent
        due = min(total, int((perf() - start) * rate) + 1)
        while sent < due:
            driver.dispatch(start + sent / rate)
            sent += 1

    def pace() -> None:
        scheduled = 0
        while scheduled < total and perf() < start + seconds + 5:
            time.sleep(max(0.0, start + scheduled / rate - perf()))
            scheduled = min(total, int((perf() - start) * rate) + 1)
            loop.call_soon_threadsafe(dispatch_due)
        loop.call_soon_threadsafe(finished.set_result, None)

    pacer = threading.Thread(target=pace, name="open-loop-pacer", daemon=True)
    pacer.start()
    await finished  # the pacer's last dispatch ran before this, in order
    pacer.join()
    tally = await driver.finish(timeout=10)
    if sent < total:
        tally.errors["not sent: the schedule fell 5 s behind"] += total - sent
    if driver.waiting:
        tally.errors["not sent: no connection came free"] += len(driver.waiting)
    tally.elapsed_s = perf() - start
    return tally


class _ClosedLoop(_Driver):
    stop_at = 0.0

    def next(self, client: Client) -> None:
        if perf() < self.stop_at:
            self.send(client, perf())


async def closed_loop(port: int, payload: bytes, connections: int, seconds: float) -> Tally:
    """`connections` connections sending back to back for `seconds`."""
    driver = _ClosedLoop(payload)
    driver.clients = [await connect(driver, port) for _ in range(connections)]
    start = perf()
    driver.stop_at = start + seconds
    for client in driver.clients:
        driver.send(client, perf())
    await asyncio.sleep(seconds)
    tally = await driver.finish(timeout=10)
    tally.elapsed_s = perf() - start
    return tally


class Holder(_Driver):
    """Streams kept open: `streaming` counts those whose first token came and that still live."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.streaming = 0
        self.token_came = asyncio.Event()

    def first_token(self, client: Client, now: float) -> None:
        self.streaming += 1
        self.tally.ttft.append(now - client.sent_at)
        self.token_came.set()

    def done(self, client: Client, status: int, ok: bool, now: float) -> None:
        self.tally.errors[f"stream ended (status {status})"] += 1

    def lost(self, client: Client) -> None:
        if client.first_at:
            self.streaming -= 1
            client.first_at = 0.0


async def hold_streams(holder: Holder, port: int, count: int, *, batch: int = 250,
                       batch_timeout: float = 20.0,
                       progress: Callable[[str], None] | None = None) -> None:
    """Open `count` streams, `batch` at a time, each batch once the last one streams."""
    while len(holder.clients) < count:
        size = min(batch, count - len(holder.clients))
        results = await asyncio.gather(
            *(connect(holder, port, 10.0) for _ in range(size)), return_exceptions=True)
        for result in results:
            if isinstance(result, Client):
                holder.clients.append(result)
                result.send(holder.payload, perf())
            else:
                holder.tally.errors[f"connect: {result!r}"[:120]] += 1
        deadline = perf() + batch_timeout
        while holder.streaming < len(holder.clients) and perf() < deadline:
            holder.token_came.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(holder.token_came.wait(), 1.0)
        if progress is not None and (len(holder.clients) % 2000 < size or size < batch):
            progress(f"    streams open: {holder.streaming}")
        if holder.streaming < len(holder.clients) - size // 2:
            holder.tally.errors["a batch of streams did not start; stopped opening"] += 1
            return
