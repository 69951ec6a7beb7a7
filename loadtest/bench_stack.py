"""What the gateway's benchmarks run against, started and stopped as one: Postgres, Redis,
Kafka and the CMP from devstack (for the JWKS, keys and registry entries), the stand-ins for the
runtime of `loadtest.standins` (the canned runtime and a relay that does no work), and the
gateway itself under each ASGI server, pinned to its core.
"""


from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import uvloop

from cmp.registry import BucketLimit, Limits
from devstack.procs import ManagedProcess, free_port, http_ready, tcp_ready
from devstack.seed import create_tenant_agent
from devstack.stack import Ports, Stack, StackSettings
from loadtest.bench_gateway import Agent, Target
from loadtest.standins import OPEN_FILES, raise_open_files

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_CORE, LOAD_CORE = 0, 1
# `uvicorn-poll`'s GATEWAY_BUSY_POLL_US: longer than the gap between chats at the overhead's
# 2,000/s, so that the worker, on its own core, polls between them instead of sleeping.
BUSY_POLL_US = 1000


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
                                     neighbours, relay_port, transport(server))
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
            name=name, argv=[sys.executable, "-m", "loadtest.standins", "--port", str(port),
                             "--ttft-ms", str(self.ttft_ms), "--core", str(core), *options],
            log_path=self.stack.root / "logs" / f"{name}.log", ready=tcp_ready(port), cwd=ROOT)

    def gateway(
        self, server: str, port: int, env: dict[str, str] | None = None, name: str = "",
    ) -> ManagedProcess:
        """The stack's gateway (same environment) on `port`, pinned to its core with a raised
        open-files limit, under `python -m gateway` (`uvicorn`: uvicorn with the gateway's own
        protocol for chats; `uvicorn-poll`: as `uvicorn`, busy polling for BUSY_POLL_US after
        each chat (gateway.busy_poll); `uvicorn-asgi`: uvicorn's stock protocol, every route
        via ASGI; `uvicorn-http`: as `uvicorn`, but runs go to the runtime over HTTP/1.1 instead
        of the runtime link) or granian."""
        base, limit = self.stack.process("gateway"), self.open_files
        prefix = ["prlimit", f"--nofile={limit}:{limit}", "taskset", "-c", str(GATEWAY_CORE)]
        command = [sys.executable, "-m", "gateway"] if server.startswith("uvicorn") else [
            str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--loop",
            "uvloop", "--workers", "1", "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--backlog", "16384", "--backpressure", str(limit), "--log-level", "warning",
            "gateway.app:create_app"]
        name = name or f"gateway-{server}"
        env = {**base.env, "GATEWAY_PORT": str(port),
               "GATEWAY_SPOOL_DIR": str(self.stack.root / name / "spool"),
               "GATEWAY_HTTP": "asgi" if server == "uvicorn-asgi" else "gateway",
               "GATEWAY_RUNTIME_TRANSPORT": transport(server),
               "GATEWAY_BUSY_POLL_US": str(busy_poll_us(server)),
               **(env or {})}
        return dataclasses.replace(
            base, name=name, argv=prefix + command, cwd=ROOT, env=env,
            ready=http_ready(f"http://127.0.0.1:{port}/readyz"),
            log_path=self.stack.root / "logs" / f"{name}.log")

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


def busy_poll_us(server: str) -> int:
    return BUSY_POLL_US if server == "uvicorn-poll" else 0


def transport(server: str) -> str:
    return "http" if server == "uvicorn-http" else "link"


def worker_pid(pid: int) -> int:
    """The process that runs the app: granian's worker is a child; uvicorn's one worker is it."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children[0] if children else pid
