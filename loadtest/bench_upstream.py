"""Benchmark the gateway's upstream client against httpx.AsyncClient, same run, same upstream.

The upstream is a canned raw-asyncio server in its own process, pinned to the other core: every
POST gets the same small SSE answer (chunked, five tokens and an end event). Each client runs the
same rounds, alternating; the round with the median requests/s is reported. Last, many streams
are opened and left idle to measure what one idle stream costs the client.

    python loadtest/bench_upstream.py [--requests 10000] [--concurrency 32] [--idle-streams 2000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import resource
import socket
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import uvloop

from gateway.sse import encode_event
from gateway.upstream import UpstreamPool, UpstreamSettings

TOKENS = (b"Hel", b"lo", b",", b" wor", b"ld")
EVENTS = b"".join(
    [encode_event(b"token", b'{"text": "%s"}' % token) for token in TOKENS]
    + [encode_event(b"end", b'{"text": "Hello, world", "usage": {"input_tokens": 3, '
                            b'"output_tokens": 5}}')]
)
STREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(EVENTS), EVENTS)
)
IDLE_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(EVENTS[:40]), EVENTS[:40])
)
REQUEST_BODY = b'{"input_value": "Say hello", "session_id": "a:s", "variables": {"tenant_id": "t"}}'
HEADERS = [
    (b"authorization", b"Bearer runtime-token"),
    (b"content-type", b"application/json"),
    (b"accept", b"text/event-stream"),
]


# --- the canned upstream -------------------------------------------------------------------------


class CannedUpstream(asyncio.Protocol):
    """Answers each request as soon as its head and body are in; `/idle` answers never end."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            assert self.transport is not None
            self.transport.write(IDLE_ANSWER if head.startswith(b"post /idle") else STREAM_ANSWER)


def serve(port: int, core: int | None, ready: Any) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(CannedUpstream, "127.0.0.1", port, backlog=4096)
        ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# --- the clients ---------------------------------------------------------------------------------

Fetch = Callable[[], Awaitable[int]]


def sitekit_fetch(pool: UpstreamPool, url: str) -> Fetch:
    async def fetch() -> int:
        response = await pool.request("POST", url, HEADERS, REQUEST_BODY)
        size = 0
        async for chunk in response.iter_raw():
            size += len(chunk)
        await response.aclose()
        return size
    return fetch


def httpx_fetch(client: httpx.AsyncClient, url: str) -> Fetch:
    headers = [(name.decode(), value.decode()) for name, value in HEADERS]

    async def fetch() -> int:
        size = 0
        async with client.stream("POST", url, headers=headers, content=REQUEST_BODY) as response:
            async for chunk in response.aiter_raw():
                size += len(chunk)
        return size
    return fetch


async def run_round(fetch: Fetch, requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            size = await fetch()
            latencies.append(time.perf_counter() - started)
            assert size == len(EVENTS), size

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": round(len(latencies) / elapsed),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
    }


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


async def idle_stream_cost(
    open_stream: Callable[[], Awaitable[object]], count: int
) -> dict[str, int]:
    """Bytes per open, idle stream: Python heap (tracemalloc) and process RSS."""
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    heap_before = tracemalloc.get_traced_memory()[0]
    streams: list[object] = []
    while len(streams) < count:  # in batches, so the upstream's accept queue keeps up
        batch = min(200, count - len(streams))
        streams += await asyncio.gather(*[open_stream() for _ in range(batch)])
    gc.collect()
    heap = tracemalloc.get_traced_memory()[0] - heap_before
    tracemalloc.stop()
    rss = rss_bytes() - rss_before
    assert len(streams) == count
    return {"python_heap": heap // count, "rss": rss // count}


async def bench(args: argparse.Namespace, base: str) -> dict[str, Any]:
    url, idle_url = base + "/flows/demo/stream", base + "/idle"
    settings = UpstreamSettings(max_idle_per_origin=max(256, args.concurrency))
    pool = UpstreamPool(settings)
    limits = httpx.Limits(max_connections=args.idle_streams + args.concurrency,
                          max_keepalive_connections=args.concurrency)
    client = httpx.AsyncClient(limits=limits, timeout=30.0)
    fetches = {"sitekit": sitekit_fetch(pool, url), "httpx": httpx_fetch(client, url)}

    for fetch in fetches.values():  # warm up connections and code paths
        await run_round(fetch, args.requests // 10, args.concurrency)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in fetches}
    sequential: dict[str, list[dict[str, float]]] = {name: [] for name in fetches}
    for _ in range(args.rounds):
        for name, fetch in fetches.items():
            rounds[name].append(await run_round(fetch, args.requests, args.concurrency))
            sequential[name].append(await run_round(fetch, args.requests // 5, 1))

    result: dict[str, Any] = {}
    for name in fetches:
        concurrent = sorted(rounds[name], key=lambda r: r["rps"])[len(rounds[name]) // 2]
        alone = sorted(sequential[name], key=lambda r: r["p50_ms"])[len(sequential[name]) // 2]
        result[name] = {
            **concurrent,
            "sequential_p50_ms": alone["p50_ms"],
            "sequential_p99_ms": alone["p99_ms"],
            "sequential_rps": alone["rps"],
        }
    result["rps_ratio"] = round(result["sitekit"]["rps"] / result["httpx"]["rps"], 2)

    async def open_sitekit() -> object:
        response = await pool.request("POST", idle_url, HEADERS, REQUEST_BODY)
        await anext(response.iter_raw())
        return response

    async def open_httpx() -> object:
        request = client.build_request("POST", idle_url, content=REQUEST_BODY)
        response = await client.send(request, stream=True)
        await anext(response.aiter_raw())
        return response

    result["idle_stream_bytes"] = {
        "sitekit": await idle_stream_cost(open_sitekit, args.idle_streams),
        "httpx": await idle_stream_cost(open_httpx, args.idle_streams),
    }
    await pool.aclose()
    await client.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-streams", type=int, default=2_000)
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    upstream = spawn.Process(target=serve, args=(port, server_core, ready), daemon=True)
    upstream.start()
    try:
        if not ready.wait(10):
            raise SystemExit("the canned upstream did not start")
        if client_core is not None:
            os.sched_setaffinity(0, {client_core})
        result = uvloop.run(bench(args, f"http://127.0.0.1:{port}"))
    finally:
        upstream.terminate()
        upstream.join(5)
    print(json.dumps({
        "benchmark": "upstream client: small streamed POST (SSE, chunked, 6 events)",
        "client_core": client_core,
        "upstream_core": server_core,
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        **result,
    }))


if __name__ == "__main__":
    main()
