"""`make bench`: the gateway's performance budget (DESIGN.md), measured on this machine.

Starts what `loadtest.bench_stack` describes (a minimal real stack, the canned runtime, a relay
that does no work, and one gateway worker under each server: `uvicorn` with the gateway's own
protocol for chats, as `python -m gateway` runs it, `uvicorn-poll` as that with busy polling
(GATEWAY_BUSY_POLL_US, for a worker on a core of its own), `uvicorn-asgi` with uvicorn's stock one,
`uvicorn-http` as `uvicorn` but reaching the runtime over HTTP/1.1 instead of the runtime link,
and granian; all on loopback, the gateways and the relay on core 0, this load generator and
everything else on core 1), measures each server with `loadtest.bench_gateway`, profiles the
first one with py-spy, then merges the runtime's and the CMP's own benchmarks
(`loadtest.bench_runtime`, `loadtest.bench_cmp`). Prints one JSON object on stdout (the top-level
figures are the first server's, `uvicorn`; `with_busy_poll` repeats them for `uvicorn-poll`)
and its progress on stderr; about ten minutes.

    .venv/bin/python -m loadtest.bench [--quick] [--no-runtime] [--no-cmp]
                         [--servers uvicorn,uvicorn-poll,uvicorn-http,uvicorn-asgi,granian]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import uvloop

from devstack.procs import free_port
from loadtest import bench_gateway, guest_idle, loadgen
from loadtest.bench_gateway import Target, Targets
from loadtest.bench_stack import GATEWAY_CORE, LOAD_CORE, ROOT, BenchStack, busy_poll_us

PROFILE = ROOT / ".stack" / "bench" / "gateway-profile.txt"  # py-spy's collapsed stacks
LOOP_PROBE = ROOT / ".stack" / "bench" / "loop-probe"  # the probed worker's <this>.<pid>.json
TTFT_DELAY_MS = 20.0
OVERHEAD_KEYS = tuple(f"{series}_{p}_ms" for series in (
    "overhead", "overhead_beyond_one_hop", "direct", "relay", "gateway") for p in ("p50", "p99"))
TARGETS = {"overhead_p50_ms": ("<=", 0.5), "overhead_p99_ms": ("<=", 2.0),
           "max_rps_per_worker": (">=", 5000), "streams_per_worker": (">=", 10_000),
           "ttft_overhead_ms": ("<=", 1.0), "runtime_cpu_ms_per_turn": ("<=", 20.0)}
ROUND_TRIPS_MEASURED_AS = (
    "the limiter's own count at the max_rps point: delta of gateway_limiter_redis_round_trips_"
    "total / gateway_limiter_checks_total (one check per request); cross-check: redis_read_"
    "events_per_request, Redis INFO total_reads_processed per request (every client)")
OPTIONS: tuple[tuple[str, type, object, str], ...] = (
    ("--servers", str, "uvicorn,uvicorn-poll,uvicorn-http,uvicorn-asgi,granian",
     "servers (uvicorn, uvicorn-poll, uvicorn-http, uvicorn-asgi, granian); the first one is "
     "profiled and gives the top-level figures"),
    ("--rate", float, 2000.0, "open-loop requests/s for the overhead"),
    ("--low-rate", float, 500.0, "a rate the worker can take, for the overhead without queueing"),
    ("--seconds", float, 5.0, "per overhead run"),
    ("--rounds", int, 3, "overhead rounds and max_rps repeats"),
    ("--streams", int, 10_000, "concurrent SSE streams to open"),
    ("--connections", str, "16,64,256", "closed-loop concurrencies to try"),
    ("--rps-seconds", float, 4.0, "per closed-loop run"),
    ("--profile-seconds", float, 10.0, "py-spy sampling; 0 to skip"),
    ("--py-spy", str, str(Path(sys.executable).parent / "py-spy"), "the py-spy binary"),
    ("--tail-seconds", float, 5.0, "a probed worker at --rate, for where the tail comes from; 0 "
     "to skip"),
    (guest_idle.OPTION, str, str(guest_idle.KERNEL_DEFAULT_NS), guest_idle.OPTION_HELP),
)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--no-runtime", action="store_true", help="skip bench_runtime")
    parser.add_argument("--no-cmp", action="store_true", help="skip bench_cmp")
    parser.add_argument("--quick", action="store_true", help="short runs, to try the bench")
    args = parser.parse_args()
    try:
        args.halt_poll_ns = guest_idle.parse_setting(args.guest_halt_poll_ns)
    except ValueError as exc:
        parser.error(str(exc))
    if args.quick:
        args.seconds, args.rounds, args.streams, args.rps_seconds = 2.0, 1, 1000, 2.0
        args.profile_seconds = min(args.profile_seconds, 3.0)
    return args


async def measure(
    targets: Targets, args: argparse.Namespace, errors: list[str], bench: BenchStack,
) -> dict[str, Any]:
    """Per server: streaming checks, streams, TTFT; then overhead and throughput with the
    servers taking turns, so that both see the same machine. A phase that fails is reported in
    `errors` and the others still run."""
    found: dict[str, dict[str, Any]] = {server: {} for server in targets}
    for server, t in list(targets.items()):
        try:
            await loadgen.closed_loop(t.gateway_port, t.via_gateway("fast"), 32, 2.0)  # warm-up
            progress(f"{server}: streaming and disconnect check, {args.streams} streams, TTFT")
            found[server]["checks"] = await bench_gateway.disconnect_check(t)
            found[server]["streams"] = await bench_gateway.streams(t, count=args.streams,
                                                                   progress=progress)
            found[server]["ttft"] = await bench_gateway.ttft(t, rate=100, count=300,
                                                             delay_ms=TTFT_DELAY_MS)
        except Exception as exc:  # noqa: BLE001 - the other server may still be measured
            errors.append(f"{server}: {exc!r}"[:600])
            del targets[server]
    try:
        progress(f"overhead at {args.rate:.0f}/s and {args.low_rate:.0f}/s, then throughput")
        phases = {
            "overhead": await bench_gateway.overhead(
                targets, rate=args.rate, seconds=args.seconds, rounds=args.rounds,
                progress=progress),
            "overhead_at_low_rate": await bench_gateway.overhead(
                targets, rate=args.low_rate, seconds=args.seconds, rounds=1, progress=progress),
            "max_rps": await bench_gateway.max_rps(
                targets, connections=tuple(int(c) for c in args.connections.split(",")),
                seconds=args.rps_seconds, rounds=args.rounds, progress=progress),
        }
    except Exception as exc:  # noqa: BLE001 - what was measured so far is still reported
        errors.append(f"overhead or throughput: {exc!r}"[:600])
        phases = {}
    halt = getattr(args, "halt_polling", None)
    if targets and phases and halt is not None:
        with halt.as_found() as differs:
            if differs:
                progress(f"overhead at {args.rate:.0f}/s again, with the guest's halt polling at "
                         f"the machine's {halt.found} ns")
                try:
                    phases["overhead_idle_as_found"] = await bench_gateway.overhead(
                        targets, rate=args.rate, seconds=args.seconds, rounds=args.rounds,
                        progress=progress)
                except Exception as exc:  # noqa: BLE001 - the headline is measured already
                    errors.append(f"overhead with halt polling as found: {exc!r}"[:600])
    for server, t in targets.items():
        found[server].update({phase: by_server[server] for phase, by_server in phases.items()})
        found[server]["usage_metrics"] = {
            k: v for k, v in bench_gateway.scrape(t.gateway_port).items()
            if k.startswith(("gateway_usage", "gateway_limiter"))}
    if targets and args.profile_seconds > 0:
        server, t = next(iter(targets.items()))
        progress(f"{server}: profiling the worker under load ({args.profile_seconds:.0f} s)")
        found[server]["profile"] = await profile(t, args.profile_seconds, args.py_spy)
    if targets and args.tail_seconds > 0:
        server, t = next(iter(targets.items()))
        progress(f"{server}: a probed worker at {args.rate:.0f}/s, for where the tail comes from")
        try:
            found[server]["tail_profile"] = await tail_profile(
                bench, server, t, args.rate, args.tail_seconds)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            errors.append(f"tail profile: {exc!r}"[:600])
    return found


async def tail_profile(
    bench: BenchStack, server: str, t: Target, rate: float, seconds: float,
) -> dict[str, Any]:
    """Where the overhead's tail comes from: a worker of its own runs with GATEWAY_LOOP_PROBE
    (gateway.loop_probe) at the overhead's rate, and reports at shutdown how late its event loop
    ran callbacks and where it was meanwhile. Probing slows a worker a little, so the latency
    measured here is not the headline's."""
    LOOP_PROBE.parent.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before any load
    for old in LOOP_PROBE.parent.glob(f"{LOOP_PROBE.name}.*.json"):  # noqa: ASYNC240
        old.unlink()
    port = free_port()
    process = bench.launch(bench.gateway(server, port, {"GATEWAY_LOOP_PROBE": str(LOOP_PROBE)},
                                         name=f"gateway-{server}-probed"), 60)
    try:
        payload = t.via_gateway("fast")
        await loadgen.open_loop(port, payload, rate, 1.0)  # warm-up
        tally = await loadgen.open_loop(port, payload, rate, seconds)
    finally:
        await asyncio.to_thread(process.stop)  # the worker writes its report as it stops
    reports = [orjson.loads(path.read_bytes())  # noqa: ASYNC240 - the worker has stopped
               for path in LOOP_PROBE.parent.glob(f"{LOOP_PROBE.name}.*.json")]
    if not reports:
        raise RuntimeError(f"the probed worker wrote no report beside {LOOP_PROBE}")
    summary = tally.summary()
    return {"rate_per_s": rate, "seconds": seconds, "latency_while_probed": summary["latency"],
            "errors": summary["errors"], "loop": max(reports, key=lambda r: r["probes"])}


async def profile(t: Target, seconds: float, py_spy: str) -> dict[str, Any]:
    """py-spy samples the worker (without pausing it) while a closed loop keeps it busy."""
    PROFILE.parent.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before any load
    spy = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(t.pid), "--duration", str(round(seconds)), "--rate", "250",
        "--nonblocking", "--format", "raw", "-o", str(PROFILE),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        tally = await loadgen.closed_loop(t.gateway_port, t.via_gateway("fast"), 64, seconds + 1)
        _, stderr = await asyncio.wait_for(spy.communicate(), 30)
    finally:
        if spy.returncode is None:
            spy.kill()
            await spy.wait()
    if spy.returncode != 0:
        return {"error": f"py-spy failed: {stderr.decode(errors='replace')[-300:]}"}
    return {"collapsed_stacks": str(PROFILE), "rps_while_sampling": tally.rps(), **top_costs()}


def top_costs(count: int = 20) -> dict[str, Any]:
    """Shares of the samples by function and by module where they were spent (self time)."""
    functions: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    for line in PROFILE.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if ";" not in stack:  # C code or a released GIL: py-spy saw no Python frame
            functions["(no Python frame)"] += int(samples)
            modules["(no Python frame)"] += int(samples)
            continue
        name, _, where = stack.rsplit(";", 1)[-1].partition(" (")
        path = where.rsplit(":", 1)[0]
        for prefix in ("site-packages/", f"{ROOT}/", "lib/python3.11/"):
            path = path.split(prefix, 1)[-1]
        functions[f"{name} ({path})" if path else name] += int(samples)
        modules[path if path.startswith(("gateway/", "ratelimit/")) else path.split("/")[0]] += \
            int(samples)
    total = max(functions.total(), 1)
    return {"samples": functions.total(), **{
        kind: [f"{100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(count)]
        for kind, counter in (("self_by_function", functions), ("self_by_module", modules))}}


def sub_bench(name: str, module: str, errors: list[str], timeout: float = 600) -> dict[str, Any]:
    """Another benchmark script of this folder, run on its own; its JSON is merged."""
    progress(f"{name}: python -m {module}")
    try:
        done = subprocess.run([sys.executable, "-m", module], cwd=ROOT,
                              capture_output=True, timeout=timeout, check=False)
        out = done.stdout.strip()
        # The JSON object is the whole output, or its last line after the script's own lines.
        found: dict[str, Any] = orjson.loads(out if out.startswith(b"{") else
                                             out.splitlines()[-1] if out else b"")
        return found
    except subprocess.TimeoutExpired:
        errors.append(f"{name}: {module} took longer than {timeout:.0f} s")
    except orjson.JSONDecodeError:
        tail = done.stderr.decode(errors="replace")[-400:]
        errors.append(f"{name}: {module} exited {done.returncode}: {tail}")
    return {}


def cmp_summary(found: dict[str, Any]) -> dict[str, Any]:
    """The CMP's headline figures: each list's p99 on its first and deepest page timed."""
    lists = found.get("cmp_lists", {})
    p99 = {
        name: {page: timing["p99_ms"] for page, timing in pages.items()}
        for name, pages in lists.items() if name != "rows"
    }
    journey = found.get("cmp_webhook_to_first_token", {})
    return {"cmp_list_p99_ms": p99, "cmp_rows": lists.get("rows"),
            "cmp_webhook_to_first_token_ms": journey.get("median_first_token_ms")}


def server_summary(found: dict[str, Any]) -> dict[str, Any]:
    overhead, low = found.get("overhead", {}), found.get("overhead_at_low_rate", {})
    as_found = found.get("overhead_idle_as_found", {})
    best, streams = found.get("max_rps", {}).get("best", {}), found.get("streams", {})
    return {
        **{k: overhead.get(k) for k in OVERHEAD_KEYS},
        # Each round's own overhead, of which the two above are the medians: how far apart
        # the rounds of one run land says how much the machine moved under them.
        **{k: overhead.get(k) for k in ("overhead_p50_rounds_ms", "overhead_p99_rounds_ms")},
        "gateway_answered_per_s": overhead.get("gateway_answered_per_s"),
        "overhead_worker_cpu_share": overhead.get("worker_cpu_share"),
        "overhead_worker_cpu_us_per_request": overhead.get("worker_cpu_us_per_request"),
        f"at_{low.get('rate_per_s', 0):.0f}_per_s": {
            **{k: low.get(k) for k in OVERHEAD_KEYS},
            "worker_cpu_share": low.get("worker_cpu_share"),
            "worker_cpu_us_per_request": low.get("worker_cpu_us_per_request"),
        },
        # The overhead at --rate once more, the guest's halt polling as the machine had it
        # (None when the bench held the value it found, or could not change it).
        "overhead_idle_as_found": {k: as_found.get(k) for k in (
            "overhead_p50_ms", "overhead_p99_ms", "overhead_p50_rounds_ms",
            "overhead_p99_rounds_ms", "direct_p99_ms", "gateway_p99_ms", "worker_cpu_share",
            "worker_cpu_us_per_request")} if as_found else None,
        "max_rps_per_worker": best.get("rps"), "max_rps_at_connections": best.get("connections"),
        "max_rps_429s": best.get("statuses", {}).get("429", 0),
        "max_rps_errors": best.get("errors"),
        "worker_cpu_us_per_request": best.get("worker_cpu_us_per_request"),
        "rps_at_full_core": best.get("rps_at_full_core"),
        "streams_per_worker": streams.get("streams_per_worker"),
        "kib_per_stream": streams.get("kib_per_stream"),
        "open_files_per_stream": streams.get("open_files_per_stream"),
        "streams_bounded_by_open_files": streams.get("bounded_by_open_files_limit"),
        "ttft_overhead_ms": found.get("ttft", {}).get("ttft_overhead_ms"),
        "redis_round_trips_per_request": best.get("limiter_round_trips_per_check",
                                                  best.get("redis_reads_per_request")),
        "redis_read_events_per_request": best.get("redis_reads_per_request"),
        "redis_calls_per_request": best.get("redis_calls_per_request"),
        "checks": found.get("checks"),
    }


def phase_errors(server: str, found: dict[str, Any]) -> list[str]:
    seen = [("max_rps", found.get("max_rps", {}).get("best", {}).get("errors")),
            *((phase, found.get(phase, {}).get("errors")) for phase in ("streams", "checks")),
            *((f"overhead round {i + 1}", run[server]["errors"])
              for i, run in enumerate(found.get("overhead", {}).get("runs", [])))]
    return [f"{server} {phase}: {errors}" for phase, errors in seen if errors]


def notes(found: dict[str, Any], rate: float) -> list[str]:
    """What the numbers mean, where that is not obvious from them."""
    said = []
    answered = found.get("gateway_answered_per_s") or 0
    if answered and answered < 0.97 * rate:
        said.append(f"at {rate:.0f}/s the worker answered only {answered}/s: it is saturated, so "
                    "the overhead at that rate is mostly queueing; see at_*_per_s")
    if found.get("streams_bounded_by_open_files"):
        said.append("streams_per_worker was bounded by the worker's RLIMIT_NOFILE (each stream "
                    "holds a descriptor); raising the hard limit needs CAP_SYS_RESOURCE")
    return said


def halt_polling_notes(halt: guest_idle.HaltPolling | None) -> list[str]:
    if halt is None or halt.held is None:
        return []
    default = " (the kernel's default)" if halt.held == guest_idle.KERNEL_DEFAULT_NS else ""
    return [f"the bench ran with the guest's halt polling at {halt.held} ns{default}; the machine "
            f"had {halt.found} ns, put back at the end: overhead_idle_as_found is the overhead "
            "with that value, same run"]


def report(servers: dict[str, dict[str, Any]], runtime: dict[str, Any], errors: list[str],
           args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    name = next(iter(servers), None)
    main = servers.get(name or "", {})
    halt: guest_idle.HaltPolling | None = getattr(args, "halt_polling", None)
    found: dict[str, Any] = server_summary(main) if main else {}
    found.pop("checks", None)
    found.update({
        "redis_round_trips_measured_as": ROUND_TRIPS_MEASURED_AS,
        "runtime_cpu_ms_per_turn": runtime.get("runtime_cpu_ms_per_turn"),
        "lfx_baseline_cpu_ms_per_turn": runtime.get("lfx_baseline_cpu_ms_per_turn"),
        "server": name, "busy_poll_us": busy_poll_us(name or ""),
        "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()},
    })
    found["met"] = {k: None if found.get(k) is None else found[k] <= bound if op == "<="
                    else found[k] >= bound for k, (op, bound) in TARGETS.items()}
    if name == "uvicorn" and "uvicorn-poll" in servers:
        # The same worker with busy polling, as a worker on a core of its own may run.
        polling = server_summary(servers["uvicorn-poll"])
        found["with_busy_poll"] = {k: polling[k] for k in (*TARGETS, "overhead_worker_cpu_share")
                                   if k in polling}
    found.update({
        "notes": notes(found, args.rate) + halt_polling_notes(halt),
        "servers": {s: server_summary(r) for s, r in servers.items()},
        "profile": main.get("profile"), "runtime": runtime or None,
        "machine": {"cores": os.cpu_count(), "gateway_core": GATEWAY_CORE, "load_core": LOAD_CORE,
                    "load_avg_at_end": os.getloadavg(), "quick": args.quick,
                    "other_processes_cpu_share": getattr(args, "others_cpu_share", None),
                    "open_files_limit": getattr(args, "open_files", None),
                    # CPU ms of a fixed piece of work per core (machine_speed), before and after
                    # the gateway's phases: higher means a slower hour of the shared machine.
                    "speed_ms": {"at_start": getattr(args, "speed_at_start", None),
                                 "after_gateway": getattr(args, "speed_at_end_of_gateway", None)},
                    "guest_halt_polling": halt.report() if halt else None,
                    "bench_seconds": round(seconds)},
        "errors": errors, "details": servers,
    })
    return found


def run(args: argparse.Namespace, errors: list[str]) -> dict[str, dict[str, Any]]:
    os.sched_setaffinity(0, {LOAD_CORE})  # inherited by Redis, Kafka, the CMP, the runtime
    root = Path(tempfile.mkdtemp(prefix="sitekit-bench-"))
    root.chmod(0o755)  # Postgres runs as its own user under root and must reach its folder
    progress(f"stack in {root}")
    bench = BenchStack(root, args.servers.split(","), ttft_ms=TTFT_DELAY_MS, progress=progress)
    args.open_files = bench.open_files
    try:
        return uvloop.run(measure(bench.start(), args, errors, bench))
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        errors.append(f"bench: {exc!r}"[:800])
        return {}
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def machine_speed() -> dict[str, float]:
    """Per core, the CPU milliseconds a fixed piece of interpreter work takes (best of five),
    so that runs in a fast and a slow hour of a shared machine can be told apart: the host's
    other tenants slow every figure here without showing as stolen time. The first pass on
    each core only warms up."""
    cores = sorted(os.sched_getaffinity(0))
    found = {}
    try:
        for core in cores:
            os.sched_setaffinity(0, {core})
            times = []
            for _ in range(6):
                start = time.process_time()
                table: dict[str, int] = {}
                for i in range(100_000):
                    table[f"key-{i % 997}"] = table.get(f"key-{i % 991}", 0) + len(str(i))
                times.append((time.process_time() - start) * 1000)
            found[f"core{core}"] = round(min(times[1:]), 1)
    finally:
        os.sched_setaffinity(0, cores)
    return found


def main() -> int:
    args = options()
    stdout = os.dup(1)
    os.dup2(2, 1)  # children and libraries print to stderr; stdout carries the JSON alone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    args.speed_at_start = machine_speed()
    started, machine_before = time.monotonic(), bench_gateway.core_ticks()
    errors: list[str] = []
    if args.profile_seconds > 0 and not Path(args.py_spy).exists():
        errors.append(f"profile: {args.py_spy} not found (.venv/bin/pip install py-spy)")
        args.profile_seconds = 0
    with guest_idle.HaltPolling(args.halt_poll_ns) as halt:
        args.halt_polling = halt
        if halt.held is not None:
            progress(f"the guest's halt polling held at {halt.held} ns (found {halt.found} ns)")
        elif halt.why_not:
            progress(f"the guest's halt polling: {halt.why_not}")
        return finish(args, stdout, errors, started, machine_before)


def finish(args: argparse.Namespace, stdout: int, errors: list[str], started: float,
           machine_before: list[tuple[int, int]]) -> int:
    try:
        servers = run(args, errors)
    except KeyboardInterrupt:  # everything was stopped on the way out
        progress("bench: interrupted")
        return 130
    # CPU the machine spent during the run that was not this bench's (other people's work):
    # all cores' busy time, less this process's and its (waited-for) children's.
    ours = sum(os.times()[:4])
    busy = sum(b - b0 for (b0, _), (b, _) in zip(machine_before, bench_gateway.core_ticks(),
                                                 strict=True)) / os.sysconf("SC_CLK_TCK")
    args.others_cpu_share = round(max(busy - ours, 0) / (time.monotonic() - started)
                                  / (os.cpu_count() or 1), 2)
    for server, found in servers.items():
        errors += phase_errors(server, found)
    args.speed_at_end_of_gateway = machine_speed()
    runtime = {} if args.no_runtime else sub_bench("runtime", "loadtest.bench_runtime", errors)
    cmp = {} if args.no_cmp else sub_bench("cmp", "loadtest.bench_cmp", errors, 900)
    found = report(servers, runtime, errors, args, time.monotonic() - started)
    found.update(cmp_summary(cmp))
    found["cmp"] = cmp or None
    os.write(stdout, orjson.dumps(found, option=orjson.OPT_INDENT_2) + b"\n")
    return 0 if servers else 1


if __name__ == "__main__":
    sys.exit(main())
