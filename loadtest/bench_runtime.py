"""CPU per chat turn of the demo flow: the runtime's path against the stock lfx path.

    .venv/bin/python loadtest/bench_runtime.py [--turns 40] [--tokens 40] [--no-server]

Prints one JSON object. The mock LLM runs in its own process (its CPU is not counted) at a
fast pace. Both paths run in this process on the same deployed demo flow:

- lfx baseline: what `lfx serve` does per request, minus its one-run-per-worker guard:
  `copy.deepcopy` of the loaded graph, request variables on the copy, then
  `graph.async_start(...)` with `create_stream_tokens_event_manager`, stock HTTP clients
  and stock component code paths; tokens are read from the event queue. lfx's services
  are prepared as the runtime prepares them (`runtime.lfx_setup`, plain log lines), which
  only spares the baseline the cost of logging a traceback per missing service.
- runtime: `FlowEngine.run` with `runtime.lfx_tuning` installed, tokens encoded as SSE.

CPU is `time.process_time()` (all threads of this process) per turn, sequentially (median,
mean, min) and for batches of 20 turns in flight (CPU of the batch / 20). The two paths
alternate turn by turn (the tuning is installed for runtime turns only), so a busy machine
slows both alike. Both are measured once this process has settled its garbage collector as
the server does at start (`runtime.app.settle_garbage_collector`). Unless
`--no-server`, the real server (`python -m runtime`) is also measured over HTTP: the CPU
its process spent (from /proc) per streamed turn.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.procs import ManagedProcess, free_port  # noqa: E402
from devstack.services import python_service  # noqa: E402
from runtime.config import RuntimeConfig, apply_engine_environment  # noqa: E402

TOKEN = "bench-service-token-0123456789"
SESSION = "bench-session"
Turn = Callable[[str], Awaitable[int]]


def start_mock(log_dir: Path, tokens: int) -> tuple[ManagedProcess, str]:
    port = free_port()
    env = {"MOCKLLM_PORT": str(port), "MOCKLLM_FIRST_TOKEN_MS": "0",
           "MOCKLLM_TOKENS_PER_S": "20000", "MOCKLLM_ANSWER_TOKENS": str(tokens)}
    mock = python_service("mockllm", "runtime.mockllm", port, log_dir, env)
    mock.cwd = ROOT
    mock.start()
    mock.wait_ready(30)
    return mock, f"http://127.0.0.1:{port}/v1"


def baseline_turn(flow: dict[str, Any], config: RuntimeConfig) -> Turn:
    from lfx.events.event_manager import create_stream_tokens_event_manager
    from lfx.graph import Graph
    from lfx.run._defaults import apply_run_defaults
    from lfx.schema.schema import InputValueRequest

    from runtime.engine import RUNTIME_USER_ID

    graph_id = "0b0d5a7e-7a43-4a8e-9d0b-6a8f8f3c2b11"
    loaded = Graph.from_payload(copy.deepcopy(flow), flow_id=graph_id, user_id=RUNTIME_USER_ID)
    loaded.prepare()

    async def turn(text: str) -> int:
        graph = copy.deepcopy(loaded)
        graph.context["request_variables"] = {"tenant_id": "t1", **config.credential_variables()}
        apply_run_defaults(graph, session_id=SESSION, user_id=RUNTIME_USER_ID)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        manager = create_stream_tokens_event_manager(queue=queue)  # type: ignore[no-untyped-call]
        inputs = InputValueRequest.model_validate({"input_value": text, "session": SESSION})
        # lfx annotates `inputs` as a list but passes it to astep, which takes one request.
        async for _ in graph.async_start(inputs=inputs, event_manager=manager):  # type: ignore[arg-type]
            pass
        tokens = 0
        while not queue.empty():
            _, payload, _ = queue.get_nowait()
            if orjson.loads(payload)["event"] == "token":
                tokens += 1
        return tokens

    return turn


def runtime_turn(engine: Any, flow_id: str) -> Turn:
    from runtime.engine import RunRequest
    from runtime.streaming import sse

    deployed = engine.get(flow_id)
    variables = engine.request_variables({"tenant_id": "t1"})

    async def turn(text: str) -> int:
        queue: asyncio.Queue[str] = asyncio.Queue()
        result = await engine.run(deployed, RunRequest(text, SESSION, variables), queue)
        chunks = [sse("token", {"text": queue.get_nowait()}) for _ in range(queue.qsize())]
        usage = {"input_tokens": result.input_tokens, "output_tokens": result.output_tokens}
        chunks.append(sse("end", {"text": result.text, "session_id": SESSION, "usage": usage}))
        return len(chunks) - 1

    return turn


class EnginePath:
    """One of the two paths: its turn, and what must be in place while it runs."""

    def __init__(self, label: str, turn: Turn, enter: Callable[[], None]) -> None:
        self.label, self.turn, self.enter = label, turn, enter
        self.per_turn: list[float] = []
        self.in_flight: list[float] = []

    async def timed(self, text: str) -> None:
        self.enter()
        start = time.process_time()
        await self.turn(text)
        self.per_turn.append((time.process_time() - start) * 1000)

    async def batch(self, tag: str) -> None:
        self.enter()
        start = time.process_time()
        await asyncio.gather(*(self.turn(f"{tag} question {i}") for i in range(20)))
        self.in_flight.append((time.process_time() - start) * 1000 / 20)


async def measure(paths: list[EnginePath], turns: int) -> None:
    """Alternate the paths turn by turn, so both see the same machine (it is shared)."""
    for path in paths:
        path.enter()
        for i in range(5):
            if await path.turn(f"warm up {i}") == 0:
                raise RuntimeError(f"{path.label}: the warm-up turn streamed no tokens")
    for i in range(turns):
        for path in paths:
            await path.timed(f"question number {i} about my order")
    for b in range(max(turns // 20, 1)):
        for path in paths:
            await path.batch(f"batch {b}")


def proc_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def measure_server(flow: dict[str, Any], llm_url: str, log_dir: Path, turns: int) -> float:
    port = free_port()
    env = {"RUNTIME_PORT": str(port), "RUNTIME_SERVICE_TOKEN": TOKEN,
           "RUNTIME_FLOWS_DIR": str(log_dir / "server-flows"), "RUNTIME_LLM_BASE_URL": llm_url}
    server = python_service("runtime", "runtime", port, log_dir, env)
    server.cwd = ROOT
    server.start()
    try:
        server.wait_ready(120)
        assert server.popen is not None
        headers = {"authorization": f"Bearer {TOKEN}"}
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
            (await client.put("/flows/demo", json={"version": 1, "flow": flow})).raise_for_status()

            async def turn(i: int) -> None:
                body = {"input_value": f"server question {i}", "session_id": SESSION,
                        "variables": {"tenant_id": "t1"}}
                async with client.stream("POST", "/flows/demo/stream", json=body) as response:
                    async for _ in response.aiter_bytes():
                        pass

            for i in range(5):
                await turn(i)
            start = proc_cpu_ms(server.popen.pid)
            for i in range(turns):
                await turn(i)
            return (proc_cpu_ms(server.popen.pid) - start) / turns
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    mock, llm_url = start_mock(log_dir, args.tokens)
    try:
        config = RuntimeConfig(service_token=TOKEN, flows_dir=log_dir / "flows",
                               llm_base_url=llm_url, log_level="error")
        apply_engine_environment(config, os.environ)
        from runtime.app import settle_garbage_collector
        from runtime.components import ComponentCatalogue
        from runtime.engine import FlowEngine
        from runtime.flow_store import FlowStore
        from runtime.lfx_setup import prepare_lfx
        from runtime.lfx_tuning import EngineTuning

        prepare_lfx(config.log_level)
        flow = orjson.loads((ROOT / "runtime/flows/demo.json").read_bytes())
        tuning = EngineTuning()
        # The stock engine keeps langchain-openai's per-chunk timeout (one task per token).
        chunk_timeout = "LANGCHAIN_OPENAI_STREAM_CHUNK_TIMEOUT_S"
        runtime_value = config.engine_defaults()[chunk_timeout]

        def stock() -> None:
            tuning.uninstall()
            os.environ.pop(chunk_timeout, None)

        def tuned() -> None:
            tuning.install()
            os.environ[chunk_timeout] = runtime_value

        stock()
        baseline = EnginePath("lfx baseline", baseline_turn(flow, config), stock)
        tuned()
        store = FlowStore(config.flows_dir)
        store.prepare()
        engine = FlowEngine(config, await ComponentCatalogue.load(), store)
        engine.deploy("demo", 1, flow)
        ours = EnginePath("runtime", runtime_turn(engine, "demo"), tuned)
        settle_garbage_collector()  # as the server does once it has started
        await measure([baseline, ours], args.turns)
        await tuning.aclose()
        server = None
        if not args.no_server:
            server = await measure_server(flow, llm_url, log_dir, args.turns)
    except BaseException:
        sys.stderr.write(f"bench_runtime: the mock's and the runtime's logs are in {log_dir}\n")
        raise
    finally:
        mock.stop()
    shutil.rmtree(log_dir, ignore_errors=True)
    ours_ms, baseline_ms = statistics.median(ours.per_turn), statistics.median(baseline.per_turn)
    report = {
        "runtime_cpu_ms_per_turn": round(ours_ms, 2),
        "lfx_baseline_cpu_ms_per_turn": round(baseline_ms, 2),
        "runtime_cpu_ms_per_turn_mean": round(statistics.fmean(ours.per_turn), 2),
        "lfx_baseline_cpu_ms_per_turn_mean": round(statistics.fmean(baseline.per_turn), 2),
        "runtime_cpu_ms_per_turn_min": round(min(ours.per_turn), 2),
        "lfx_baseline_cpu_ms_per_turn_min": round(min(baseline.per_turn), 2),
        "runtime_cpu_ms_per_turn_20_in_flight": round(statistics.fmean(ours.in_flight), 2),
        "lfx_baseline_cpu_ms_per_turn_20_in_flight": round(
            statistics.fmean(baseline.in_flight), 2
        ),
        "runtime_server_cpu_ms_per_turn_http": None if server is None else round(server, 2),
        "speedup": round(baseline_ms / ours_ms, 1),
        "turns": args.turns,
        "answer_tokens": args.tokens,
    }
    sys.stdout.write(orjson.dumps(report).decode() + "\n")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
