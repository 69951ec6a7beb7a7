"""What the gateway's benchmarks run against, started and stopped as one: Postgres, Redis,
Kafka and the CMP from devstack (for the JWKS, keys and registry entries), stand-ins for the
runtime, and the gateway itself under each ASGI server, pinned to its core.

The stand-ins are served by this module too, on raw asyncio protocols:
- the canned runtime answers `POST /flows/<flow>/stream` in the runtime's SSE format, from
  pre-encoded bytes, keep-alive and chunked. `fast`: the whole small answer at once (five tokens
  and `end`); `hold`: the head and one token, then nothing until the client hangs up; `ttft`:
  the first token after `--ttft-ms`, the rest 10 ms later. `GET /stats` counts held streams;
- the relay (`--relay-to PORT`) does no work at all: each connection is piped byte for byte to
  one connection to PORT. Beside the gateway, it shows what one more hop costs on this machine.

    python -m loadtest.bench_stack --port 18090 [--ttft-ms 20] [--core 1]
    python -m loadtest.bench_stack --port 18091 --relay-to 18090 --core 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import asyncpg
import orjson
import redis.asyncio as aioredis
import uvloop

from cmp.registry import BucketLimit, Limits
from devstack.procs import ManagedProcess, free_port, http_ready, tcp_ready
from devstack.seed import create_tenant_agent
from devstack.stack import Ports, Stack, StackSettings
from loadtest.bench_gateway import Agent, Target

TOKENS = ("Hel", "lo", ",", " wor", "ld")
USAGE = {"input_tokens": 3, "output_tokens": 5}


def sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
FIRST_TOKEN = sse("token", {"text": TOKENS[0]})
REST = b"".join(sse("token", {"text": t}) for t in TOKENS[1:]) + sse(
    "end", {"text": "".join(TOKENS), "session_id": "bench", "usage": USAGE})
LAST_CHUNK = b"0\r\n\r\n"
FAST_ANSWER = HEAD + chunk(FIRST_TOKEN + REST) + LAST_CHUNK
HOLD_ANSWER = HEAD + chunk(FIRST_TOKEN)
REST_DELAY_S = 0.01
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


@dataclasses.dataclass(slots=True)
class Counters:
    held: int = 0
    requests: int = 0


class CannedRuntime(asyncio.Protocol):
    """One client connection; answers each whole request (head and Content-Length body)."""

    def __init__(self, counters: Counters, ttft_s: float) -> None:
        self.counters = counters
        self.ttft_s = ttft_s
        self.buffer = b""
        self.holding = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.holding:
            self.counters.held -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            if (marker := head.find(b"content-length:")) >= 0:
                stop = head.find(b"\r\n", marker)
                length = int(head[marker + 15:stop if stop >= 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.answer(head[:head.find(b" http/1.1")])

    def answer(self, line: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.counters.requests += 1
        if line == b"post /flows/fast/stream":
            transport.write(FAST_ANSWER)
        elif line == b"post /flows/hold/stream":
            self.holding = True
            self.counters.held += 1
            transport.write(HOLD_ANSWER)
        elif line == b"post /flows/ttft/stream":
            transport.write(HEAD)
            self.later(self.ttft_s, chunk(FIRST_TOKEN))
            # The rest later, so a relay that held the first token back would show in TTFT.
            self.later(self.ttft_s + REST_DELAY_S, chunk(REST) + LAST_CHUNK)
        elif line == b"get /stats":
            body = orjson.dumps({"held": self.counters.held, "requests": self.counters.requests})
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(body), body))
        else:
            transport.write(NOT_FOUND)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def later(self, delay_s: float, data: bytes) -> None:
        """Write `data` after `delay_s`, to within a few tens of microseconds. The event loop's
        timers count whole milliseconds from the start of its current iteration, so with them
        the first token would come anywhere from 19 to 21 ms after a request: as much noise as
        the time-to-first-token overhead being measured."""
        loop = asyncio.get_running_loop()
        timer = threading.Timer(delay_s, loop.call_soon_threadsafe, (self.write, data))
        timer.daemon = True
        timer.start()


class Pipe(asyncio.Protocol):
    """One side of a relayed connection: what arrives is written to the other side. The client
    side opens its upstream side when it is accepted."""

    def __init__(self, upstream_port: int, other: Pipe | None = None) -> None:
        self.upstream_port = upstream_port
        self.other = other
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what the client sent before the upstream side connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = ours = cast(asyncio.Transport, transport)
        client = self.other
        if client is None:
            asyncio.get_running_loop().create_task(self.connect())
        elif client.transport is None:  # the client left while this side was connecting
            ours.close()
        else:
            client.other = self
            ours.write(b"".join(client.early))

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Pipe(self.upstream_port, self), "127.0.0.1",
                                         self.upstream_port)
        except OSError:
            self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for side in (self, self.other):
            if side is not None and side.transport is not None:
                side.transport.close()
                side.transport = None


async def serve(port: int, ttft_s: float, relay_to: int | None) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters()
    def accept() -> asyncio.Protocol:
        return CannedRuntime(counters, ttft_s) if relay_to is None else Pipe(relay_to)

    server = await loop.create_server(accept, "127.0.0.1", port, backlog=16384)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def raise_open_files(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to `wanted` (root may raise the hard limit too); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the stack -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_CORE, LOAD_CORE = 0, 1
OPEN_FILES = 65536


class BenchStack:
    """Starts everything with `start()`, which answers the gateways to measure by server name;
    `close()` stops all that was started, whatever happened."""

    def __init__(self, root: Path, servers: list[str], *, ttft_ms: float,
                 progress: Callable[[str], None]) -> None:
        self.servers, self.ttft_ms, self.progress = servers, ttft_ms, progress
        self.stack: Stack = Stack(StackSettings(root=root, ports=Ports.free(), gateway_workers=1,
                                         postgres_dir=root / "postgres"), progress)
        self.started: list[ManagedProcess] = []
        # Raising the hard limit needs CAP_SYS_RESOURCE; without it this stays at the hard one.
        self.open_files = raise_open_files(OPEN_FILES)

    def start(self) -> dict[str, Target]:
        stack = self.stack
        stack.check_ports()
        stack.start_postgres()
        for name in ("redis", "kafka", "cmp"):
            stack.start_process(name)
        upstream = self.launch(self.standin("canned-runtime", stack.ports.runtime, LOAD_CORE))
        relay_port = free_port()
        self.launch(self.standin("relay", relay_port, GATEWAY_CORE,
                                 "--relay-to", str(stack.ports.runtime)))
        agents = uvloop.run(self.seed_agents())
        neighbours = {"load generator": os.getpid(), **{
            name: process.popen.pid for name, process in (
                ("canned runtime", upstream), ("redis", stack.processes["redis"]),
                ("kafka", stack.processes["kafka"])) if process.popen is not None}}
        targets: dict[str, Target] = {}
        for server in self.servers:
            port = stack.ports.gateway if not targets else free_port()
            self.progress(f"gateway under {server} on port {port}")
            gateway = self.launch(self.gateway(server, port), 60)
            assert gateway.popen is not None
            time.sleep(0.5)  # granian starts its worker after the listener answers
            targets[server] = Target(port, stack.ports.runtime, agents,
                                     worker_pid(gateway.popen.pid), stack.redis_url,
                                     neighbours, relay_port)
        return targets

    def launch(self, process: ManagedProcess, timeout: float = 15) -> ManagedProcess:
        self.started.append(process)
        process.start()
        process.wait_ready(timeout)
        return process

    def close(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.stack.stop()

    def standin(self, name: str, port: int, core: int, *options: str) -> ManagedProcess:
        return ManagedProcess(
            name=name, argv=[sys.executable, "-m", "loadtest.bench_stack", "--port", str(port),
                             "--ttft-ms", str(self.ttft_ms), "--core", str(core), *options],
            log_path=self.stack.root / "logs" / f"{name}.log", ready=tcp_ready(port), cwd=ROOT)

    def gateway(self, server: str, port: int) -> ManagedProcess:
        """The stack's gateway (same environment) on `port`, pinned to its core with a raised
        open-files limit, under `python -m gateway` (`uvicorn`: uvicorn with the gateway's own
        protocol for chats; `uvicorn-asgi`: uvicorn's stock protocol, every route via ASGI) or
        granian."""
        base, limit = self.stack.process("gateway"), self.open_files
        prefix = ["prlimit", f"--nofile={limit}:{limit}", "taskset", "-c", str(GATEWAY_CORE)]
        command = [sys.executable, "-m", "gateway"] if server.startswith("uvicorn") else [
            str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--loop",
            "uvloop", "--workers", "1", "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--backlog", "16384", "--backpressure", str(limit), "--log-level", "warning",
            "gateway.app:create_app"]
        env = {**base.env, "GATEWAY_PORT": str(port),
               "GATEWAY_SPOOL_DIR": str(self.stack.root / f"gateway-{server}" / "spool"),
               "GATEWAY_HTTP": "asgi" if server == "uvicorn-asgi" else "gateway"}
        return dataclasses.replace(
            base, name=f"gateway-{server}", argv=prefix + command, cwd=ROOT, env=env,
            ready=http_ready(f"http://127.0.0.1:{port}/readyz"),
            log_path=self.stack.root / "logs" / f"gateway-{server}.log")

    async def seed_agents(self) -> dict[str, Agent]:
        """An agent per behaviour of the canned runtime, with limits that refuse nothing: the
        bench measures the cost of the path, not the limits."""
        unlimited = BucketLimit(1e9, 1_000_000_000)
        conn = await asyncpg.connect(self.stack.database_url)
        redis = aioredis.from_url(self.stack.redis_url)
        try:
            agents = {}
            for flow in ("fast", "hold", "ttft"):
                made = await create_tenant_agent(
                    conn, redis, self.stack, name=f"Bench {flow}", origin="http://bench.example",
                    flow_id=flow, limits=Limits(tenant=unlimited, key=unlimited))
                agents[flow] = Agent(made["agent_id"], made["secret_key"])
            return agents
        finally:
            await redis.aclose()
            await conn.close()


def worker_pid(pid: int) -> int:
    """The process that runs the app: granian's worker is a child; uvicorn's one worker is it."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children[0] if children else pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--core", type=int, default=None)
    parser.add_argument("--relay-to", type=int, default=None)
    args = parser.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    raise_open_files(OPEN_FILES)
    uvloop.run(serve(args.port, args.ttft_ms / 1000, args.relay_to))


if __name__ == "__main__":
    main()
