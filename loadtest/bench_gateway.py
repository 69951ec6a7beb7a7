"""The gateway's measurements, against one running gateway worker and the canned runtime behind
it (`loadtest.canned_upstream`); `loadtest.bench` sets both up and calls these in turn.

Each returns a JSON-ready dict. Latency runs from when a request was due (the open loop's
schedule, so that a stalled sender cannot hide it) to the end of its response; the overhead is
the gateway's percentile minus the direct call's in the same round.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from gateway.link import LinkSettings
from loadtest import loadgen

Progress = Callable[[str], None]
REQUEST_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
CANCELLED = 'gateway_usage_events_total{status="cancelled"}'


@dataclass(frozen=True, slots=True)
class Agent:
    agent_id: str
    secret_key: str


@dataclass(frozen=True, slots=True)
class Target:
    """One gateway worker (`pid`) on `gateway_port`, the canned runtime on `upstream_port`, and
    an agent per upstream behaviour, named as its flow: `fast`, `hold`, `ttft`."""

    gateway_port: int
    upstream_port: int
    agents: dict[str, Agent]
    pid: int
    redis_url: str
    neighbours: dict[str, int]  # processes on the load core: this one, upstream, Redis, Kafka
    relay_port: int  # a relay that does no work, on the gateway core, to the upstream
    transport: str = "link"  # how the worker reaches the runtime (GATEWAY_RUNTIME_TRANSPORT)

    def via_gateway(self, flow: str) -> bytes:
        agent = self.agents[flow]
        return loadgen.http_request(
            f"/v1/agents/{agent.agent_id}/chat",
            {"authorization": f"Bearer {agent.secret_key}", "content-type": "application/json",
             "accept": "text/event-stream"},
            b'{"message": "Say hello", "session_id": "bench-session"}')

    def direct(self, flow: str) -> bytes:
        """What the gateway sends the runtime for the same chat (its headers and body)."""
        agent = self.agents[flow]
        body = orjson.dumps({
            "input_value": "Say hello", "session_id": f"{agent.agent_id}:bench-session",
            "variables": {"tenant_id": "t", "agent_id": agent.agent_id, "collection": "c",
                          "request_id": REQUEST_ID}})
        return loadgen.http_request(
            f"/flows/{flow}/stream",
            {"authorization": "Bearer runtime-token", "content-type": "application/json",
             "accept": "text/event-stream", "x-request-id": REQUEST_ID}, body)


# --- probes --------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGESIZE") // 1024


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU of the process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def open_files(pid: int) -> tuple[int, int]:
    """Descriptors the process holds, and its RLIMIT_NOFILE."""
    limits = Path(f"/proc/{pid}/limits").read_text().split("Max open files", 1)[1].split()
    return len(list(Path(f"/proc/{pid}/fd").iterdir())), int(limits[0])


def core_ticks() -> list[tuple[int, int]]:
    """Per core: (busy, total) ticks from /proc/stat; stolen time counts as busy."""
    found = []
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        if not line.startswith("cpu"):
            break
        ticks = [int(v) for v in line.split()[1:9]]
        found.append((sum(ticks) - ticks[3] - ticks[4], sum(ticks)))
    return found


def core_busy(before: list[tuple[int, int]]) -> list[float]:
    return [round((b - b0) / max(t - t0, 1), 2)
            for (b0, t0), (b, t) in zip(before, core_ticks(), strict=True)]


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return orjson.loads(response.read())


def scrape(port: int) -> dict[str, float]:
    """The gateway's /metrics as {series: value}, histogram buckets left out."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    pairs = (line.rpartition(" ") for line in lines if line and not line.startswith("#"))
    return {name: float(value) for name, _, value in pairs if "_bucket{" not in name}


def redis_counters(url: str) -> dict[str, int]:
    """Redis's read events (one per socket read: about one per client round trip) and its
    calls per command, from INFO."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        counters = {"reads": int(client.info("stats")["total_reads_processed"])}
        for name, value in client.info("commandstats").items():
            counters[name.removeprefix("cmdstat_")] = int(value["calls"])
    finally:
        client.close()
    return counters


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# --- measurements --------------------------------------------------------------------------


Targets = dict[str, Target]  # by ASGI server; all share one upstream, Redis and Kafka


async def overhead_round(
    targets: Targets, rate: float, seconds: float, turn: int = 0
) -> dict[str, dict[str, Any]]:
    """One open-loop run direct, one through the relay, then one through each server, starting
    with the `turn`-th: the servers take turns at going first, so that none is always measured
    right after the baselines or always last."""
    first = next(iter(targets.values()))
    runs = {name: await loadgen.open_loop(port, first.direct("fast"), rate, seconds)
            for name, port in (("direct", first.upstream_port), ("relay", first.relay_port))}
    servers = list(targets)
    turn %= len(servers)
    busy: dict[str, dict[str, float]] = {}
    for server in servers[turn:] + servers[:turn]:
        t = targets[server]
        before = sum(cpu_seconds(t.pid))
        runs[server] = await loadgen.open_loop(t.gateway_port, t.via_gateway("fast"), rate,
                                               seconds)
        spent, done = sum(cpu_seconds(t.pid)) - before, sum(runs[server].statuses.values())
        busy[server] = {"worker_cpu_share": round(spent / runs[server].elapsed_s, 2),
                        "worker_cpu_us_per_request": round(spent / max(done, 1) * 1e6, 1)}
    return {name: {**tally.summary(), **busy.get(name, {})} for name, tally in runs.items()}


async def overhead(targets: Targets, *, rate: float, seconds: float, rounds: int,
                   progress: Progress) -> dict[str, dict[str, Any]]:
    """Open loop at `rate`/s: direct, through the relay, then via each server, `rounds` times;
    medians of rounds, each server's overhead taken against the direct run of its round, and
    against the relay's (what is left once the cost of one more hop is taken out)."""
    await overhead_round(targets, rate, 1.0)  # warm-up
    runs = []
    for index in range(rounds):
        runs.append(await overhead_round(targets, rate, seconds, index))
        progress(f"    {rate:.0f}/s round {index + 1}: p50 " + ", ".join(
            f"{name} {run['latency']['p50_ms']} ms" for name, run in runs[-1].items()))
    return {server: {"rate_per_s": rate, "seconds": seconds, **overhead_medians(runs, server),
                     "runs": [{k: run[k] for k in ("direct", "relay", server)} for run in runs]}
            for server in targets}


def overhead_medians(runs: list[dict[str, dict[str, Any]]], server: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for which in ("p50", "p99"):
        for series, suffix in (("latency", ""), ("latency_from_send", "_from_send")):
            values = {name: [run[name][series][f"{which}_ms"] for run in runs]
                      for name in ("direct", "relay", server)}
            for name, label in (("direct", "direct"), ("relay", "relay"), (server, "gateway")):
                found[f"{label}_{which}{suffix}_ms"] = _median([v for v in values[name] if v])
            for base, label in (("direct", "overhead"), ("relay", "overhead_beyond_one_hop")):
                rounds = [g - b if b and g else None
                          for b, g in zip(values[base], values[server], strict=True)]
                found[f"{label}_{which}{suffix}_ms"] = _median([r for r in rounds if r is not None])
                if label == "overhead" and not suffix:  # each round's, beside their median
                    found[f"overhead_{which}_rounds_ms"] = [
                        None if r is None else round(r, 3) for r in rounds]
    found["gateway_answered_per_s"] = _median([run[server]["rps"] for run in runs])
    # How busy the worker was at this rate: the tail is queueing behind whatever delays it.
    for key in ("worker_cpu_share", "worker_cpu_us_per_request"):
        found[key] = _median([run[server][key] for run in runs])
    return found


LIMITER = ("gateway_limiter_redis_round_trips_total", "gateway_limiter_checks_total")


async def closed_run(t: Target, connections: int, seconds: float) -> dict[str, Any]:
    """One closed-loop run through the whole path, with the CPU each process spent, Redis's
    counters and the limiter's (the gateway copies them into /metrics once a second)."""
    await asyncio.sleep(1.1)
    redis_before, limiter_before = redis_counters(t.redis_url), scrape(t.gateway_port)
    pids, cores = {"worker": t.pid, **t.neighbours}, core_ticks()
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    tally = await loadgen.closed_loop(t.gateway_port, t.via_gateway("fast"), connections, seconds)
    cpu = {name: [a - b for a, b in zip(cpu_seconds(pids[name]), was, strict=True)]
           for name, was in cpu_before.items()}
    calls = {k: v - redis_before.get(k, 0) for k, v in redis_counters(t.redis_url).items()}
    await asyncio.sleep(1.1)
    limiter = {k: v - limiter_before.get(k, 0.0) for k, v in scrape(t.gateway_port).items()
               if k in LIMITER}
    done, worker = max(1, sum(tally.statuses.values())), sum(cpu["worker"])
    return {
        **tally.summary(), "connections": connections,
        # What the worker spent per request, and so what it would do with a core to itself.
        "worker_cpu_us_per_request": round(worker / done * 1e6, 1),
        "worker_system_cpu_share": round(cpu["worker"][1] / max(worker, 1e-9), 2),
        "rps_at_full_core": round(done / worker) if worker else None,
        "cpu_share": {name: round(sum(v) / tally.elapsed_s, 2) for name, v in cpu.items()},
        "core_busy": core_busy(cores),
        "limiter_round_trips_per_check": round(limiter[LIMITER[0]] / limiter[LIMITER[1]], 4)
        if limiter.get(LIMITER[1]) else None,
        "redis_reads_per_request": round(calls.pop("reads") / done, 4),
        "redis_calls_per_request": {k: round(v / done, 3) for k, v in calls.items() if v},
    }


async def max_rps(targets: Targets, *, connections: tuple[int, ...], seconds: float,
                  rounds: int, progress: Progress) -> dict[str, dict[str, Any]]:
    """A sweep of concurrencies, servers taking turns at each; then `rounds` more turns at each
    server's best concurrency. The run with the median requests/s is reported."""
    sweep: dict[str, list[dict[str, Any]]] = {server: [] for server in targets}
    for count in connections:
        for server, t in targets.items():
            sweep[server].append(await closed_run(t, count, seconds))
            progress(f"    {server}, {count} connections: {sweep[server][-1]['rps']}/s, "
                     f"{sweep[server][-1]['worker_cpu_us_per_request']} µs CPU per request")
    best = {server: max(runs, key=lambda r: int(r["rps"] or 0))["connections"]
            for server, runs in sweep.items()}
    again: dict[str, list[dict[str, Any]]] = {server: [] for server in targets}
    for _ in range(rounds):
        for server, t in targets.items():
            again[server].append(await closed_run(t, best[server], seconds))
    found = {}
    for server, runs in again.items():
        median = sorted(runs, key=lambda r: int(r["rps"] or 0))[len(runs) // 2]
        progress(f"    {server}: {[r['rps'] for r in runs]}/s at {best[server]} connections")
        found[server] = {"max_rps_per_worker": median["rps"], "best": median,
                         "rounds_rps": [r["rps"] for r in runs], "sweep": sweep[server]}
    return found


async def ttft(t: Target, *, rate: float, count: int, delay_ms: float,
               rounds: int = 3) -> dict[str, Any]:
    """Time to first token, direct and via the gateway, open loop at a low rate: `rounds` rounds
    of `count` requests each way, taking turns; the overhead is the median of the rounds'
    differences of medians."""
    found: dict[str, Any] = {"upstream_first_token_delay_ms": delay_ms, "runs": []}
    paths = (("direct", t.direct("ttft"), t.upstream_port),
             ("gateway", t.via_gateway("ttft"), t.gateway_port))
    for _ in range(rounds):
        run: dict[str, Any] = {}
        for name, payload, port in paths:
            await loadgen.open_loop(port, payload, rate, 0.5)
            tally = await loadgen.open_loop(port, payload, rate, count / rate)
            run[name] = {**loadgen.percentiles(tally.ttft), "samples": len(tally.ttft),
                         "errors": dict(tally.errors)}
        direct, via = run["direct"]["p50_ms"], run["gateway"]["p50_ms"]
        run["overhead_ms"] = round(via - direct, 3) if direct and via else None
        found["runs"].append(run)
    for name, _, _ in paths:
        found[name] = {"p50_ms": _median([r[name]["p50_ms"] for r in found["runs"]
                                          if r[name]["p50_ms"] is not None])}
    found["ttft_overhead_ms"] = _median([r["overhead_ms"] for r in found["runs"]
                                         if r["overhead_ms"] is not None])
    return found


async def streams(t: Target, *, count: int, progress: Progress) -> dict[str, Any]:
    """Open `count` SSE streams that the upstream holds open (fewer if the worker's open-files
    limit cannot hold them: each takes a descriptor for its client, and over the runtime link
    the links take up to `LinkSettings.max_links` more; over HTTP each takes a second one);
    count them, the worker's descriptors and its RSS growth per stream."""
    await asyncio.sleep(0.5)
    held, limit = open_files(t.pid)
    free = limit - held - 64
    attempted = min(count, free // 2 if t.transport == "http" else
                    free - LinkSettings().max_links)
    rss_before = rss_kib(t.pid)
    holder = loadgen.Holder(t.via_gateway("hold"))
    started = time.perf_counter()
    try:
        await loadgen.hold_streams(holder, t.gateway_port, attempted, progress=progress)
        opened_s = time.perf_counter() - started
        await asyncio.sleep(1.0)  # let the worker settle before reading its RSS
        open_now, rss_after = holder.streaming, rss_kib(t.pid)
        files_holding, _ = open_files(t.pid)
        upstream_held = get_json(t.upstream_port, "/stats")["held"]
        gauge = scrape(t.gateway_port).get("gateway_open_streams")
    finally:
        for client in holder.clients:
            client.close()
    return {
        "target": count, "attempted": attempted, "streams_per_worker": open_now,
        "bounded_by_open_files_limit": attempted < count, "worker_open_files_limit": limit,
        "held_at_upstream": upstream_held, "gateway_open_streams_gauge": gauge,
        "worker_open_files_before": held, "worker_open_files_while_holding": files_holding,
        "open_files_per_stream": round((files_holding - held) / max(open_now, 1), 3),
        "kib_per_stream": round((rss_after - rss_before) / max(open_now, 1), 2),
        "rss_before_mib": round(rss_before / 1024, 1), "rss_after_mib": round(rss_after / 1024, 1),
        "open_seconds": round(opened_s, 1), "ttft_while_opening": loadgen.percentiles(
            holder.tally.ttft),
        "upstream_streams_left_after_clients_closed": await _wait_released(t, 30),
        "errors": dict(holder.tally.errors),
    }


async def _wait_released(t: Target, deadline_s: float) -> int:
    """Wait until the upstream sees every held stream closed; the number still held."""
    end = time.monotonic() + deadline_s
    while (held := int(get_json(t.upstream_port, "/stats")["held"])) and time.monotonic() < end:
        await asyncio.sleep(0.25)
    return held


async def disconnect_check(t: Target) -> dict[str, Any]:
    """Streaming: the first token arrives ~10 ms before the rest. Disconnect: closing the client
    mid-stream closes the upstream stream and counts a `cancelled` usage event."""
    tally = await loadgen.open_loop(t.gateway_port, t.via_gateway("ttft"), 20, 0.5)
    cancelled = scrape(t.gateway_port).get(CANCELLED, 0.0)
    holder = loadgen.Holder(t.via_gateway("hold"))
    await loadgen.hold_streams(holder, t.gateway_port, 20, batch=20, batch_timeout=5)
    opened = holder.streaming
    for client in holder.clients:
        client.close()
    left = await _wait_released(t, 5)
    await asyncio.sleep(0.2)
    gap = [(done - first) * 1000 for done, first in zip(tally.from_send, tally.ttft, strict=False)]
    return {
        "streamed_responses_ok": tally.statuses.get(200, 0), "errors": dict(tally.errors),
        "first_token_ahead_of_end_ms": _median(gap),
        "tokens_not_buffered": bool(gap) and statistics.median(gap) > 5,
        "streams_opened": opened, "upstream_streams_left_after_disconnect": left,
        "cancelled_usage_events": scrape(t.gateway_port).get(CANCELLED, 0.0) - cancelled,
    }
