"""The usage emitter against a real Tansu broker: event shape, broker restart, kill -9."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from devstack.procs import free_port
from gateway.ids import uuid7
from gateway.spool import (
    SegmentWriter,
    encode_record,
    lock_owner,
    read_segment,
    segment_path,
)
from gateway.usage import EmitterClosed, UsageEmitter, UsageRecord, encode_event

REPO = Path(__file__).resolve().parents[2]


def fast_emitter(
    bootstrap: str, topic: str, spool: Path, instance: str, adopt_interval: float = 30.0,
) -> UsageEmitter:
    """Short timeouts, so that an outage is noticed and the broker's return seen quickly, and
    small segments (~150 events), so that rolling over and replaying across them is tested."""
    return UsageEmitter(
        bootstrap_servers=bootstrap, topic=topic, spool_dir=spool, instance=instance,
        send_timeout=1.5, connect_timeout=1.0, backoff_min=0.05, backoff_max=0.5,
        segment_bytes=64 * 1024, adopt_interval=adopt_interval)


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    except TopicAlreadyExistsError:
        # Tansu creates a topic on first mention; after a restart the emitter may be first.
        pass
    finally:
        await admin.close()


async def consume(bootstrap: str, topic: str, want: set[str]) -> list[Any]:
    """Every message of the topic until all of `want` was seen (or 30 s passed: the caller's
    assertion then names what is missing)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    messages: list[Any] = []
    seen: set[str] = set()
    try:
        async with asyncio.timeout(30):
            while not want <= seen:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    messages.extend(batch)
                    seen.update(orjson.loads(m.value)["id"] for m in batch)
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return messages


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """A liveness bound, not a timing assertion: fail only if it never happens."""
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def record(i: int, **changes: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "request_id": uuid7(), "tenant_id": f"tenant-{i % 5}", "agent_id": f"agent-{i % 5}",
        "key_id": "key-1", "session_id": f"session-{i}", "status": "completed",
        "input_tokens": i, "output_tokens": 2 * i, "duration_ms": 10.5, "ttft_ms": 1.25,
    }
    return UsageRecord(**{**fields, **changes})


def event_ids(messages: list[Any]) -> list[str]:
    return [orjson.loads(m.value)["id"] for m in messages]


async def test_events_have_the_cloudevents_shape(
    kafka_bootstrap: str, usage_topic: str, tmp_path: Path,
) -> None:
    await create_topic(kafka_bootstrap, usage_topic)
    emitter = UsageEmitter(
        bootstrap_servers=kafka_bootstrap, topic=usage_topic, spool_dir=tmp_path,
        instance="gw-shape")
    await emitter.start()
    records = [
        record(1, time=1_790_000_000.25),
        record(2, status="failed", ttft_ms=None, session_id=None, output_tokens=0),
        record(3, status="cancelled", duration_ms=7.123456),
    ]
    for usage in records:
        emitter.emit(usage)
    await emitter.close()
    assert (emitter.counters.sent, emitter.spool_depth, os.listdir(tmp_path)) == (3, 0, [])

    messages = await consume(kafka_bootstrap, usage_topic, {r.request_id for r in records})
    by_id = {orjson.loads(m.value)["id"]: m for m in messages}
    assert len(messages) == 3
    for usage in records:
        message = by_id[usage.request_id]
        assert message.key == usage.tenant_id.encode()
        assert dict(message.headers) == {
            "content-type": b"application/cloudevents+json; charset=utf-8"}
        event = orjson.loads(message.value)
        moment = datetime.fromtimestamp(usage.time, UTC).isoformat().replace("+00:00", "Z")
        assert event == {
            "specversion": "1.0",
            "id": usage.request_id,
            "source": "gateway/gw-shape",
            "type": "sitekit.usage.v1",
            "subject": usage.agent_id,
            "time": moment,
            "datacontenttype": "application/json",
            "data": {
                "tenant_id": usage.tenant_id,
                "agent_id": usage.agent_id,
                "key_id": "key-1",
                "session_id": usage.session_id,
                "status": usage.status,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "duration_ms": round(usage.duration_ms, 3),
                "ttft_ms": usage.ttft_ms,
            },
        }
    assert orjson.loads(by_id[records[0].request_id].value)["time"] == "2026-09-21T14:13:20.250000Z"


async def test_emit_refuses_unknown_statuses_and_a_closed_emitter(tmp_path: Path) -> None:
    emitter = UsageEmitter(bootstrap_servers="127.0.0.1:1", spool_dir=tmp_path, instance="gw")
    await emitter.start()
    with pytest.raises(ValueError):
        emitter.emit(record(1, status="done"))
    await emitter.close(drain_timeout=0)
    with pytest.raises(EmitterClosed):
        emitter.emit(record(2))


async def test_a_broker_restart_mid_stream_loses_nothing(
    kafka_service: Any, kafka_bootstrap: str, usage_topic: str, tmp_path: Path,
) -> None:
    await create_topic(kafka_bootstrap, usage_topic)
    emitter = fast_emitter(kafka_bootstrap, usage_topic, tmp_path, "gw-restart")
    acked: list[str] = []
    acknowledged = emitter._sender._acknowledged

    def spy(batch: Any) -> None:  # what Kafka acknowledged, seen where the emitter learns it
        acked.extend(orjson.loads(value)["id"] for _, value in batch.records)
        acknowledged(batch)

    emitter._sender._acknowledged = spy  # type: ignore[method-assign]
    await emitter.start()
    emitted: list[str] = []
    emitting = True

    async def emit_steadily() -> None:
        i = 0
        while emitting:
            usage = record(i)
            emitter.emit(usage)
            emitted.append(usage.request_id)
            i += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(emit_steadily())
    await wait_until(lambda: emitter.counters.sent >= 200, "events delivered live")
    await asyncio.to_thread(kafka_service.stop)
    # The memory engine forgets the log on restart: what it acknowledged before is gone.
    acked_before_stop = set(acked)
    at_stop = len(emitted)
    await wait_until(lambda: emitter.counters.failed > 0, "the outage noticed")
    await wait_until(lambda: len(emitted) >= at_stop + 300, "events emitted while down")
    await asyncio.to_thread(kafka_service.start)
    await create_topic(kafka_bootstrap, usage_topic)
    await wait_until(lambda: emitter.counters.replayed > 0, "the spool replayed")
    at_replay = len(emitted)
    await wait_until(lambda: len(emitted) >= at_replay + 200, "events emitted after")
    emitting = False
    await task
    await emitter.close(drain_timeout=30)
    assert emitter.spool_depth == 0
    assert emitter.counters.spooled > 0
    assert os.listdir(tmp_path) == []  # every segment acknowledged and deleted

    missing_before = set(emitted) - acked_before_stop
    messages = await consume(kafka_bootstrap, usage_topic, missing_before)
    delivered_after = set(event_ids(messages))
    assert not missing_before - delivered_after, "events lost over the restart"
    # In order per partition (duplicates are allowed: the consumer dedupes by id).
    position = {event_id: i for i, event_id in enumerate(emitted)}
    for partition in {m.partition for m in messages}:
        seen: set[str] = set()
        firsts = []
        for event_id in event_ids([m for m in messages if m.partition == partition]):
            if event_id not in seen:
                seen.add(event_id)
                firsts.append(position[event_id])
        assert firsts == sorted(firsts), f"partition {partition} out of order"


@pytest.mark.parametrize("broker_dies", ["idle", "mid-round"])
async def test_nothing_is_sent_on_metadata_learned_before_a_broker_restart(
    broker_dies: str, kafka_service: Any, kafka_bootstrap: str, usage_topic: str, tmp_path: Path,
) -> None:
    """Tansu's memory engine forgets its topics on restart, yet acknowledges a write into a
    topic it does not know; creating the topic then starts its offsets at 0 again, under those
    writes, and a batch acknowledged later inside their offsets is never served to a consumer.
    A producer that kept the metadata of the broker before the restart writes exactly there
    (devstack creates the topic only once the port is open; the end-to-end test lost the first
    request after a restart so). After a lost connection the emitter must neither resend a round
    nor send a new one before it has asked the restarted broker for the topic again.

    idle: the broker restarts between two rounds. mid-round: it dies with a round in flight."""
    await create_topic(kafka_bootstrap, usage_topic)
    emitter = UsageEmitter(  # a long send timeout: a round in flight outlives the outage
        bootstrap_servers=kafka_bootstrap, topic=usage_topic, spool_dir=tmp_path,
        instance="gw-stale", send_timeout=10.0, connect_timeout=1.0, backoff_min=0.05,
        backoff_max=0.2)
    await emitter.start()
    # One tenant: every event on one partition, where the offsets of the two topics collide.
    records = [record(i, tenant_id="tenant-0") for i in range(12)]

    async def deliver(batch: list[UsageRecord]) -> None:
        for usage in batch:
            emitter.emit(usage)
        await wait_until(lambda: emitter.spool_depth == 0, "delivered")

    await deliver(records[:3])
    if broker_dies == "idle":
        await asyncio.to_thread(kafka_service.stop)
        await asyncio.sleep(0.3)  # down for a while, as in a real restart
        await asyncio.to_thread(kafka_service.start)
        await deliver(records[3:8])  # before anybody created the topic again
    else:
        kafka_service.process.signal(signal.SIGSTOP)  # takes the round, never answers
        for usage in records[3:8]:
            emitter.emit(usage)
        await asyncio.sleep(0.3)  # the round is sent and waits for its answer
        await asyncio.to_thread(kafka_service.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(kafka_service.start)
        await wait_until(lambda: emitter.spool_depth == 0, "delivered after the restart")
    await create_topic(kafka_bootstrap, usage_topic)  # as devstack does once the port is open
    await deliver(records[8:9])
    await deliver(records[9:])
    await emitter.close()

    want = {usage.request_id for usage in records[3:]}  # the broker forgot the first three
    lost = want - set(event_ids(await consume(kafka_bootstrap, usage_topic, want)))
    assert not lost, f"events {[i for i, r in enumerate(records) if r.request_id in lost]} lost"


VICTIM = """
import asyncio, sys
from gateway.ids import uuid7
from gateway.usage import UsageEmitter, UsageRecord

async def main(bootstrap, topic, spool, barrier):
    emitter = UsageEmitter(bootstrap_servers=bootstrap, topic=topic, spool_dir=spool,
        instance="victim", send_timeout=1.0, connect_timeout=0.5, backoff_max=0.2,
        segment_bytes=64 * 1024)
    await emitter.start()
    i = 0
    while True:
        ids = []
        for _ in range(50):
            ids.append(uuid7())
            emitter.emit(UsageRecord(ids[-1], f"tenant-{i % 5}", "agent", "key", "session",
                "completed", 1, 2, 3.0, 1.0))
            i += 1
        if barrier == "fsync":
            await emitter.wait_durable()  # written and fsynced
        else:
            await asyncio.sleep(0)  # only emitted: the flush task has not run for them yet
        # The parent holds us to exactly these.
        sys.stdout.write(" ".join(ids) + "\\n")
        sys.stdout.flush()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize(("kafka_up", "barrier"), [
    (True, "fsync"), (False, "fsync"), (False, "emitted"), (True, "emitted"),
], ids=["kafka-up", "kafka-down", "kafka-down-emitted", "kafka-up-emitted"])
async def test_kill_9_loses_no_emitted_event(
    kafka_up: bool, barrier: str, kafka_bootstrap: str, usage_topic: str, tmp_path: Path,
) -> None:
    """A kill -9 at any moment loses no event whose emit() had returned (with `emitted`, the
    victim reports each batch as soon as emit() returned, before any flush or fsync)."""
    await create_topic(kafka_bootstrap, usage_topic)
    # kafka-down: the victim's broker address has nobody listening, so all of it is spooled.
    victim_bootstrap = kafka_bootstrap if kafka_up else f"127.0.0.1:{free_port()}"
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", VICTIM, victim_bootstrap, usage_topic, str(tmp_path), barrier,
        stdout=asyncio.subprocess.PIPE, cwd=REPO)
    assert victim.stdout is not None
    durable: list[str] = []
    try:
        while len(durable) < 3000:
            line = await victim.stdout.readline()
            assert line.endswith(b"\n"), "the victim died by itself"
            durable.extend(line.decode().split())
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        await victim.wait()
    tail = await victim.stdout.read()  # lines written before the kill landed count too
    for line in tail.split(b"\n")[:-1]:
        durable.extend(line.decode().split())
    assert any(name.endswith(".seg") for name in os.listdir(tmp_path))

    heir = fast_emitter(kafka_bootstrap, usage_topic, tmp_path, "heir")
    await heir.start()
    await wait_until(
        lambda: not any(name.startswith("victim.") for name in os.listdir(tmp_path)),
        "the dead worker's spool replayed and removed")
    await heir.close()
    assert heir.spool_depth == 0
    if not kafka_up:
        assert heir.counters.replayed >= len(durable)

    messages = await consume(kafka_bootstrap, usage_topic, set(durable))
    lost = set(durable) - set(event_ids(messages))
    assert not lost, f"{len(lost)} of {len(durable)} durable events lost"


async def test_events_the_spool_cannot_take_wait_in_memory_in_order(
    kafka_bootstrap: str, usage_topic: str, tmp_path: Path,
) -> None:
    """A new segment that cannot be made (here: over the file size limit, as on a full disk)
    leaves events in memory; they are written, in emit order, once it can be, and delivered."""
    await create_topic(kafka_bootstrap, usage_topic)
    emitter = UsageEmitter(
        bootstrap_servers=kafka_bootstrap, topic=usage_topic, spool_dir=tmp_path,
        instance="gw-full", segment_bytes=4096, backoff_min=0.05)
    await emitter.start()
    records = [record(i) for i in range(40)]  # about eight fit in a segment
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        for usage in records[:30]:
            emitter.emit(usage)
        written = [p for p in os.listdir(tmp_path) if p.endswith(".seg")]
        assert written == [segment_path(tmp_path, emitter_owner(tmp_path), 0).name]
        on_disk = read_segment(tmp_path / written[0]).records
        assert 0 < len(on_disk) < 30 and emitter.counters.accepted == 30
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    for usage in records[30:]:
        emitter.emit(usage)
    await emitter.wait_durable()  # the flush task wrote what waited, then the rest
    await emitter.close()
    assert emitter.spool_depth == 0 and emitter.counters.dropped == 0
    messages = await consume(kafka_bootstrap, usage_topic, {r.request_id for r in records})
    assert sorted(set(event_ids(messages))) == sorted(r.request_id for r in records)
    for partition in {m.partition for m in messages}:  # in emit order
        order = [orjson.loads(m.value)["data"]["input_tokens"]
                 for m in messages if m.partition == partition]
        assert order == sorted(order)


def emitter_owner(spool: Path) -> str:
    [lock] = [name for name in os.listdir(spool) if name.endswith(".lock")]
    return lock[: -len(".lock")]


async def test_a_spool_left_by_close_is_replayed_by_the_next_worker(
    kafka_bootstrap: str, usage_topic: str, tmp_path: Path,
) -> None:
    await create_topic(kafka_bootstrap, usage_topic)
    nobody = f"127.0.0.1:{free_port()}"
    first = fast_emitter(nobody, usage_topic, tmp_path, "gw")
    await first.start()
    records = [record(i) for i in range(500)]
    for usage in records:
        first.emit(usage)
    await first.close(drain_timeout=30)  # gives up at the first failed round while closing
    assert first.spool_depth == 500 and first.counters.sent == 0

    second = fast_emitter(kafka_bootstrap, usage_topic, tmp_path, "gw")
    await second.start()
    await wait_until(lambda: second.counters.replayed == 500, "the left spool replayed")
    await second.close()
    assert os.listdir(tmp_path) == []
    messages = await consume(kafka_bootstrap, usage_topic, {r.request_id for r in records})
    ids = event_ids(messages)
    assert set(ids) == {r.request_id for r in records}
    for partition in {m.partition for m in messages}:  # replayed in emit order
        order = [orjson.loads(m.value)["data"]["input_tokens"]
                 for m in messages if m.partition == partition]
        assert order == sorted(order)


async def test_a_running_worker_adopts_the_spool_of_a_sibling_that_died(
    kafka_bootstrap: str, usage_topic: str, tmp_path: Path,
) -> None:
    await create_topic(kafka_bootstrap, usage_topic)
    survivor = fast_emitter(kafka_bootstrap, usage_topic, tmp_path, "gw", adopt_interval=0.05)
    await survivor.start()
    # The sibling's spool as a crash leaves it: segments on disk, its lock freed by the kernel.
    owner = "gw.999999.dead01"
    lock_fd = lock_owner(tmp_path, owner)
    writer = SegmentWriter(tmp_path, owner)
    writer.open()
    records = [record(i) for i in range(400)]
    for i, usage in enumerate(records):
        writer.append(encode_record(*encode_event(usage, "gateway/gw")))
        if i % 100 == 99:
            writer.roll()
    writer.close()
    os.close(lock_fd)

    await wait_until(lambda: survivor.counters.replayed == 400, "the orphan replayed")
    await survivor.close()
    assert os.listdir(tmp_path) == []
    messages = await consume(kafka_bootstrap, usage_topic, {r.request_id for r in records})
    assert sorted(event_ids(messages)) == sorted(r.request_id for r in records)


@pytest.mark.parametrize("round_interval", [0.0, 0.1])
async def test_a_steady_trickle_of_events_is_sent_in_rounds_of_round_interval(
    kafka_bootstrap: str, usage_topic: str, tmp_path: Path, round_interval: float,
) -> None:
    """A Kafka request per flush (every 5 ms) costs more than the events it carries; with a
    round interval the live path gathers them (and without one it does not)."""
    await create_topic(kafka_bootstrap, usage_topic)
    emitter = UsageEmitter(
        bootstrap_servers=kafka_bootstrap, topic=usage_topic, spool_dir=tmp_path,
        instance="gw-rounds", round_interval=round_interval)
    await emitter.start()
    emitter.emit(record(0))
    await wait_until(lambda: emitter.counters.sent == 1, "the first event was sent")
    rounds_before = emitter.counters.rounds
    records = [record(i) for i in range(1, 61)]
    for usage in records:  # 60 events over about 0.6 s
        emitter.emit(usage)
        await asyncio.sleep(0.01)
    await emitter.close()
    assert (emitter.counters.sent, emitter.spool_depth) == (61, 0)
    rounds = emitter.counters.rounds - rounds_before
    if round_interval:
        assert rounds <= 0.6 / round_interval + 3, rounds
    else:
        assert rounds > 20, rounds
    messages = await consume(kafka_bootstrap, usage_topic, {r.request_id for r in records})
    assert {r.request_id for r in records} <= set(event_ids(messages))
