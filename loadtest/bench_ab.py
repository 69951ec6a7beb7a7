"""Paired rounds of the gateway's overhead, to tell a change of a worker's settings from the
noise of a shared machine.

    .venv/bin/python -m loadtest.bench_ab --variant poll300:GATEWAY_BUSY_POLL_US=300 \\
        [--variant NAME:KEY=VALUE[,KEY=VALUE...] ...] [--rounds 10] [--rate 2000] [--seconds 5] \\
        [--guest-halt-poll-ns NS|found]

One stack as `make bench` sets it up (`loadtest.bench_stack`, the guest's halt polling held as
`make bench` holds it: `loadtest.guest_idle`): the worker as `make up` runs it
(`default`) and one more worker per variant, the same but for the variant's `GATEWAY_*`
settings, all pinned to the gateway's core. Each round calls the upstream directly, through the
bench's do-nothing relay, then through every worker in turn, at the same open-loop rate (the
workers take turns at going first); a worker's overhead in a round is its p50 and p99 minus the
direct call's. Rounds of one `make bench` differ by several times at p99 on this machine, so
one run cannot show a change of a few tenths of a millisecond; rounds taken side by side can.

Prints one JSON object: per worker, the figures `make bench` gives a server's overhead rounds
(each round's overheads, their medians, the CPU share), each round's CPU share,
and how many rounds met the p99 target; per variant, in how many rounds its p99 overhead was
below the default worker's, with the two-sided sign test's p-value of that count (with 10
rounds, 9 or more of 10 either way is what chance gives about 2% of the time).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import uvloop  # noqa: E402

from devstack.procs import free_port  # noqa: E402
from loadtest import guest_idle  # noqa: E402
from loadtest.bench import TARGETS, TTFT_DELAY_MS, machine_speed  # noqa: E402
from loadtest.bench_gateway import Target, overhead_medians, overhead_round  # noqa: E402
from loadtest.bench_stack import LOAD_CORE, BenchStack, worker_pid  # noqa: E402

DEFAULT = "default"
P99_TARGET_MS = TARGETS["overhead_p99_ms"][1]


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    name: str
    env: dict[str, str]


def parse_variant(text: str) -> Variant:
    """`NAME:KEY=VALUE[,KEY=VALUE...]`: a worker named NAME with those gateway settings."""
    name, sep, settings = text.partition(":")
    if not sep or not name or not settings:
        raise ValueError(f"variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    if name == DEFAULT or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"variant {text!r}: the name must be letters, digits, - or _, "
                         f"and not {DEFAULT!r}")
    env: dict[str, str] = {}
    for pair in settings.split(","):
        key, eq, value = pair.partition("=")
        if not eq or not key.startswith("GATEWAY_"):
            raise ValueError(f"variant {text!r}: {pair!r} is not a GATEWAY_*=VALUE setting")
        env[key] = value
    return Variant(name, env)


def sign_test_p(lower: int, rounds: int) -> float:
    """Two-sided p-value of `lower` rounds of `rounds` going one way when either way is as
    likely (ties left out by the caller)."""
    if rounds == 0:
        return 1.0
    extreme = max(lower, rounds - lower)
    tail = sum(math.comb(rounds, k) for k in range(extreme, rounds + 1)) / 2**rounds
    return min(1.0, round(2 * tail, 4))


def summarise(rounds: list[dict[str, dict[str, Any]]], variants: list[Variant],
              rate: float, seconds: float) -> dict[str, Any]:
    workers: dict[str, Any] = {}
    for name in [DEFAULT, *(v.name for v in variants)]:
        found = overhead_medians(rounds, name)  # as `make bench` reports a server's rounds
        found["rounds_p99_within_target"] = sum(
            v is not None and v <= P99_TARGET_MS for v in found["overhead_p99_rounds_ms"])
        found["worker_cpu_share_rounds"] = [run[name]["worker_cpu_share"] for run in rounds]
        workers[name] = found
    against: dict[str, Any] = {}
    base = workers[DEFAULT]["overhead_p99_rounds_ms"]
    for variant in variants:
        mine = workers[variant.name]["overhead_p99_rounds_ms"]
        untied = [(m, b) for m, b in zip(mine, base, strict=True)
                  if m is not None and b is not None and m != b]
        lower = sum(m < b for m, b in untied)
        against[variant.name] = {"env": variant.env, "p99_lower_in": lower,
                                 "of": len(untied), "sign_test_p": sign_test_p(lower, len(untied))}
    return {"rate_per_s": rate, "seconds": seconds, "rounds": len(rounds),
            "p99_target_ms": P99_TARGET_MS, "workers": workers, "against_default": against}


def start(bench: BenchStack, variants: list[Variant]) -> dict[str, Target]:
    """The stack, its default worker, and a worker per variant."""
    targets: dict[str, Target] = {DEFAULT: bench.start()["uvicorn"]}
    for variant in variants:
        port = free_port()
        gateway = bench.launch(
            bench.gateway("uvicorn", port, variant.env, name=f"gateway-{variant.name}"), 60)
        assert gateway.popen is not None
        targets[variant.name] = dataclasses.replace(
            targets[DEFAULT], gateway_port=port, pid=worker_pid(gateway.popen.pid))
    return targets


async def measure(targets: dict[str, Target], args: argparse.Namespace
                  ) -> list[dict[str, dict[str, Any]]]:
    await overhead_round(targets, args.rate, 1.0)  # warm-up
    rounds = []
    for index in range(args.rounds):
        rounds.append(await overhead_round(targets, args.rate, args.seconds, index))
        print(f"round {index + 1}: p99 " + ", ".join(
            f"{name} {run['latency']['p99_ms']} ms" for name, run in rounds[-1].items()),
            file=sys.stderr, flush=True)
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], required=True,
                        help="NAME:KEY=VALUE[,KEY=VALUE...], GATEWAY_* settings; repeatable")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop requests/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument(guest_idle.OPTION, default=str(guest_idle.KERNEL_DEFAULT_NS),
                        help=guest_idle.OPTION_HELP)
    args = parser.parse_args()
    try:
        variants = [parse_variant(text) for text in args.variant]
        halt_poll_ns = guest_idle.parse_setting(args.guest_halt_poll_ns)
    except ValueError as exc:
        parser.error(str(exc))
    if len({v.name for v in variants}) != len(variants):
        parser.error("each variant needs a name of its own")
    if args.rounds < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--rounds, --rate and --seconds must be positive")
    stdout = os.dup(1)
    os.dup2(2, 1)  # children print to stderr; stdout carries the JSON alone
    speed_at_start = machine_speed()
    os.sched_setaffinity(0, {LOAD_CORE})  # inherited by Redis, Kafka, the CMP, the runtime
    root = Path(tempfile.mkdtemp(prefix="sitekit-bench-ab-"))
    root.chmod(0o755)  # Postgres runs as its own user under root and must reach its folder
    bench = BenchStack(root, ["uvicorn"], ttft_ms=TTFT_DELAY_MS,
                       progress=lambda message: print(message, file=sys.stderr, flush=True))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    try:
        with guest_idle.HaltPolling(halt_poll_ns) as halt:
            rounds = uvloop.run(measure(start(bench, variants), args))
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    found = summarise(rounds, variants, args.rate, args.seconds)
    found["machine"] = {"speed_ms": {"at_start": speed_at_start, "at_end": machine_speed()},
                        "guest_halt_polling": halt.report()}
    os.write(stdout, orjson.dumps(found, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
