"""Usage emitter cost from one process, against a Tansu broker this script starts.

Measures, on one event loop (uvloop) as in a gateway worker:
- `emit_us`: the cost of one `emit()` call on the request path (building the record apart);
- `delivered_per_s`: events emitted as fast as possible and acknowledged by Kafka, per second;
- `cpu_us_per_event`: this process's CPU per event for the whole pipeline (encode, spool write,
  fsync thread, Kafka batches), i.e. what a worker pays per request; Tansu's CPU not counted;
- the same CPU with Kafka unreachable (everything goes to the spool only);
- `segment_roll_ms`: what the event loop pays when the spool's segment is full, for the next
  segment and the first record written into it (`spool.SegmentWriter.roll` and `append`),
  against `append_us`, any other record's copy.

    .venv/bin/python -m loadtest.bench_usage [--events 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from devstack.procs import free_port  # noqa: E402
from devstack.services import kafka  # noqa: E402
from gateway.ids import uuid7  # noqa: E402
from gateway.spool import SegmentWriter, encode_record  # noqa: E402
from gateway.usage import UsageEmitter, UsageRecord  # noqa: E402

TENANTS = 64


def records(count: int) -> list[UsageRecord]:
    return [
        UsageRecord(
            request_id=uuid7(), tenant_id=f"tenant-{i % TENANTS:04d}", agent_id=f"agent-{i % 97}",
            key_id=f"key-{i % 211}", session_id=f"session-{i}", status="completed",
            input_tokens=120, output_tokens=480, duration_ms=812.5, ttft_ms=95.25,
        )
        for i in range(count)
    ]


async def run(emitter: UsageEmitter, batch: list[UsageRecord], *, acked: bool) -> dict[str, float]:
    """Emit in bursts of 100 (yielding to the loop between them, as requests would) and wait
    until every event is acknowledged (or, `acked` false, durable in the spool)."""
    await emitter.start()
    cpu, wall = time.process_time(), time.perf_counter()
    emit_time = 0.0
    for start in range(0, len(batch), 100):
        burst = batch[start:start + 100]
        began = time.perf_counter()
        for usage in burst:
            emitter.emit(usage)
        emit_time += time.perf_counter() - began
        await asyncio.sleep(0)
    await emitter.wait_durable()
    while acked and emitter.spool_depth:
        await asyncio.sleep(0.001)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await emitter.close(drain_timeout=0.5)
    return {
        "emit_us": round(emit_time / len(batch) * 1e6, 3),
        "per_s": round(len(batch) / wall),
        "cpu_us_per_event": round(cpu / len(batch) * 1e6, 2),
    }


def segment_rolls(directory: Path, rolls: int = 20) -> dict[str, Any]:
    """Fill `rolls` segments of the default size with ~420-byte records, timing each append
    and each roll together with the first append after it."""
    frame = encode_record(b"tenant-0001", bytes(410))
    directory.mkdir(parents=True, exist_ok=True)
    writer = SegmentWriter(directory, "bench.1.roll")
    writer.open()
    appends: list[float] = []
    rolled: list[float] = []
    try:
        while len(rolled) < rolls:
            started = time.perf_counter()
            if writer.fits(len(frame)):
                writer.append(frame)
                appends.append(time.perf_counter() - started)
            else:
                writer.roll(len(frame))
                writer.append(frame)
                rolled.append(time.perf_counter() - started)
    finally:
        writer.close()
    appends.sort()
    rolled.sort()
    return {
        "segment_roll_ms": {"median": round(rolled[len(rolled) // 2] * 1e3, 3),
                            "max": round(rolled[-1] * 1e3, 3), "rolls": rolls},
        "append_us": {"median": round(appends[len(appends) // 2] * 1e6, 2),
                      "p99": round(appends[int(len(appends) * 0.99)] * 1e6, 2)},
    }


async def main(events: int) -> dict[str, Any]:
    build_started = time.perf_counter()
    batch = records(events)
    build_us = (time.perf_counter() - build_started) / events * 1e6
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        broker = kafka(port, Path(scratch) / "kafka")
        broker.start()
        try:
            broker.wait_ready(30)
            bootstrap = f"127.0.0.1:{port}"
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            await admin.create_topics([NewTopic("agent-usage", 3, 1)])
            await admin.close()
            await run(  # warm-up: connections, metadata, code paths
                UsageEmitter(bootstrap_servers=bootstrap, spool_dir=Path(scratch) / "warm",
                             instance="bench"), records(5_000), acked=True)
            live = await run(
                UsageEmitter(bootstrap_servers=bootstrap, spool_dir=Path(scratch) / "live",
                             instance="bench"), batch, acked=True)
            down = await run(
                UsageEmitter(bootstrap_servers=f"127.0.0.1:{free_port()}",
                             spool_dir=Path(scratch) / "down", instance="bench"),
                records(events), acked=False)
        finally:
            broker.stop()
        spool = segment_rolls(Path(scratch) / "rolls")
    return {
        "bench": "usage_emitter",
        "events": events,
        "emit_us": live["emit_us"],
        "record_build_us": round(build_us, 3),
        "delivered_per_s": live["per_s"],
        "cpu_us_per_event": live["cpu_us_per_event"],
        "spool_only_per_s": down["per_s"],
        "spool_only_cpu_us_per_event": down["cpu_us_per_event"],
        **spool,
        "broker": "tansu 0.6.0 (memory engine), acks=all",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(main(args.events))))
