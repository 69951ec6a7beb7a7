"""Usage events: one per chat request, delivered to Kafka at least once.

The event is a CloudEvents 1.0 structured-mode JSON message, keyed by tenant id (one tenant's
events stay in order on one partition):

    {"specversion": "1.0", "id": <request id, UUIDv7>, "source": "gateway/<instance>",
     "type": "sitekit.usage.v1", "subject": <agent id>, "time": <RFC 3339, UTC>,
     "datacontenttype": "application/json",
     "data": {tenant_id, agent_id, key_id, session_id, status, input_tokens, output_tokens,
              duration_ms, ttft_ms}}

Write-ahead: `emit()` encodes the record and copies it into this process's spool segment, which
is mapped into memory (`spool.SegmentWriter`: no system call, about a microsecond), before it
returns; the relay emits a chat's event before its client receives the end of the answer. Every
`flush_interval` (5 ms) the flush task hands what was written to the sender (`usage_sender`)
and wakes a worker thread that fsyncs the segment (group commit: one fsync at a time and at
most one per `sync_interval`, covering every write before it). The sender sends a round to
Kafka at most every `round_interval` (50 ms) while it keeps up.

Durability: an event survives a crash of the process (kill -9) once `emit()` has returned: it
is in the file's pages, which the kernel keeps. If the spool cannot take it (a full disk: no
new segment), it waits in memory, in order, and the flush task retries. It survives a crash of
the machine once an fsync after it has returned: within `sync_interval` (20 ms) plus an fsync.
`await wait_durable()` is that barrier. A spool left by a dead process is adopted (flock) and
replayed by the next worker that starts, or rescans (`adopt_interval`).
Duplicates are possible after failures; the consumer dedupes by event id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import orjson

from gateway.spool import Record, SegmentWriter, encode_record, lock_owner, new_owner, release
from gateway.usage_kafka import KafkaSettings
from gateway.usage_sender import UsageCounters, UsageSender

log = logging.getLogger("sitekit.gateway.usage")

EVENT_TYPE: Final = "sitekit.usage.v1"
STATUSES: Final = frozenset({"completed", "failed", "cancelled"})


@dataclass(slots=True)
class UsageRecord:
    """What the request path knows when a chat ends. Not frozen: a frozen dataclass costs four
    times as much to build, once per request; do not change it after `emit()`."""

    request_id: str
    tenant_id: str
    agent_id: str
    key_id: str
    session_id: str | None
    status: str  # completed | failed | cancelled
    input_tokens: int
    output_tokens: int
    duration_ms: float
    ttft_ms: float | None
    time: float = field(default_factory=time.time)  # when the chat ended, Unix seconds


def encode_event(record: UsageRecord, source: str) -> tuple[bytes, bytes]:
    """The Kafka (key, value) of a record; `source` is `gateway/<instance>`."""
    ttft = record.ttft_ms
    value = orjson.dumps(
        {
            "specversion": "1.0",
            "id": record.request_id,
            "source": source,
            "type": EVENT_TYPE,
            "subject": record.agent_id,
            "time": datetime.fromtimestamp(record.time, UTC),
            "datacontenttype": "application/json",
            "data": {
                "tenant_id": record.tenant_id,
                "agent_id": record.agent_id,
                "key_id": record.key_id,
                "session_id": record.session_id,
                "status": record.status,
                "input_tokens": record.input_tokens,
                "output_tokens": record.output_tokens,
                "duration_ms": round(record.duration_ms, 3),
                "ttft_ms": None if ttft is None else round(ttft, 3),
            },
        },
        option=orjson.OPT_UTC_Z,
    )
    return record.tenant_id.encode(), value


class EmitterClosed(RuntimeError):
    """`emit()` after `close()`: the event could no longer be made durable."""


class UsageEmitter:
    """Created in the lifespan: `await start()`, `emit()` per request, `await close()`."""

    def __init__(
        self, *, bootstrap_servers: str, spool_dir: Path | str, instance: str,
        topic: str = "agent-usage", send_timeout: float = 10.0, connect_timeout: float = 5.0,
        flush_interval: float = 0.005, segment_bytes: int = 4 << 20,
        round_max_events: int = 5_000, max_memory_events: int = 100_000,
        max_pending_events: int = 200_000, backoff_min: float = 0.1, backoff_max: float = 5.0,
        adopt_interval: float = 30.0, enable_idempotence: bool = False,
        round_interval: float = 0.05, sync_interval: float = 0.02,
    ) -> None:
        if min(send_timeout, connect_timeout, flush_interval, backoff_min, adopt_interval) <= 0:
            raise ValueError("usage emitter timeouts and intervals must be positive")
        if min(round_interval, sync_interval) < 0:
            raise ValueError("usage emitter round_interval and sync_interval cannot be negative")
        if backoff_max < backoff_min or min(segment_bytes, round_max_events) < 1:
            raise ValueError("usage emitter sizes must be positive, backoff_max >= backoff_min")
        self.topic = topic
        self.counters = UsageCounters()
        self._dir = Path(spool_dir)
        self._owner = new_owner(instance)
        self._source = f"gateway/{instance}"
        self._flush_interval, self._sync_interval = flush_interval, sync_interval
        self._max_pending, self._retry_delay = max_pending_events, backoff_min
        self._written: list[Record] = []  # in the spool, not yet handed to the sender
        self._unwritten: list[Record] = []  # the spool could not take them (yet)
        self._flushed = 0  # records written to the spool
        self._durable = 0  # of those, how many an fsync has covered
        self._durable_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closing = False
        self._lock_fd = -1
        self._flush_wakeup, self._sync_wakeup = asyncio.Event(), asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # One thread for the disk: fsyncs, and reading spool files back, never on the loop.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="usage-spool")
        self._writer = SegmentWriter(self._dir, self._owner, segment_bytes)
        kafka = KafkaSettings(
            bootstrap_servers, topic, f"gateway-{self._owner}", send_timeout, connect_timeout,
            # Tansu 0.6 answers InitProducerId with an error: idempotence is for real Kafka.
            enable_idempotence,
        )
        self._sender = UsageSender(
            self._writer, kafka, self.counters, self._thread,
            round_max_events=round_max_events, max_memory_events=max_memory_events,
            backoff_min=backoff_min, backoff_max=backoff_max, adopt_interval=adopt_interval,
            round_interval=round_interval,
        )

    # Metrics: this gauge, and the monotonic counters in `counters` (accepted, sent, spooled,
    # replayed, failed, dropped), plain ints read by the /metrics wiring.
    @property
    def spool_depth(self) -> int:
        """Events taken (or adopted from a dead worker's spool) and not yet acknowledged."""
        return self.counters.depth

    @property
    def connected(self) -> bool:
        """The last round reached Kafka."""
        return self._sender.connected

    async def start(self) -> None:
        """Open this process's spool; never touches the network (Kafka may come later)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_owner(self._dir, self._owner)
        self._writer.open()
        self._tasks = [asyncio.create_task(task) for task in (
            self._flush_loop(), self._sync_loop(), self._sender.run())]

    def emit(self, record: UsageRecord) -> None:
        """Take one usage event and write it to the spool; never waits. Once it returns, a
        kill -9 of the process no longer loses the event (see the module docstring)."""
        if self._closing:
            raise EmitterClosed("the usage emitter is closed")
        if record.status not in STATUSES:
            raise ValueError(f"unknown usage status {record.status!r}")
        counters = self.counters
        try:
            event = encode_event(record, self._source)
        except (TypeError, ValueError):  # e.g. a lone surrogate in a string: not JSON
            log.exception("usage: dropping unencodable event %s", record.request_id)
            counters.dropped += 1
            return
        if self._unwritten:  # the spool is failing: queue behind the others, in order
            if len(self._unwritten) >= self._max_pending:
                counters.dropped += 1
                if counters.dropped % 10_000 == 1:
                    log.error("usage: spool unwritable, %d events dropped", counters.dropped)
                return
            self._unwritten.append(event)
        elif not self._write(event):
            self._unwritten.append(event)
            self._flush_wakeup.set()
        counters.accepted += 1
        counters.depth += 1
        if len(self._written) == 1:
            self._flush_wakeup.set()

    async def wait_durable(self) -> None:
        """Return once every event accepted before the call is written and fsynced."""
        target = self.counters.accepted
        if self._durable < target:
            future = asyncio.get_running_loop().create_future()
            self._durable_waiters.append((target, future))
            await future

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop taking events and deliver what is left for up to `drain_timeout` seconds; what
        Kafka has not acknowledged stays in the spool for the next worker to replay."""
        if self._closing:
            return
        self._closing = self._sender.closing = True
        self._flush()
        if self._unwritten:
            log.error("usage: %d events could not be written to the spool and are lost",
                      len(self._unwritten))
        sender = self._sender
        if self._tasks:
            waits = [asyncio.create_task(event.wait()) for event in (sender.idle, sender.stalled)]
            await asyncio.wait(waits, timeout=drain_timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if not sender.idle.is_set():
                log.warning("usage: %d events stay in %s", self.counters.depth, self._dir)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await sender.discard_producer()
        if self._lock_fd >= 0:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._writer.close)
            self._settle_durable(self._flushed)
            drained = sender.idle.is_set() and not self._unwritten
            if not drained:
                sender.acked_mark.write(*sender.cursor)
            sender.acked_mark.close()
            release(self._dir, self._owner, self._lock_fd, remove=drained)
            for orphan in sender.orphans:
                release(self._dir, orphan.owner, orphan.lock_fd, remove=False)
        for _, future in self._durable_waiters:  # their events never reached the disk
            if not future.done():
                future.set_exception(EmitterClosed("closed before the events were written"))
        self._thread.shutdown(wait=True)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wakeup.wait()
            await asyncio.sleep(self._flush_interval)  # linger: one hand-over for a few ms
            self._flush_wakeup.clear()
            try:
                self._flush()
            except Exception:  # a bug here must not stop the spool for good
                log.exception("usage: flush failed")
            if self._unwritten:  # the spool still cannot take them; try again in a while
                await asyncio.sleep(self._retry_delay)
                self._flush_wakeup.set()

    def _flush(self) -> None:
        """Write what waits in memory, then hand what was written to the sender."""
        unwritten = self._unwritten
        if unwritten:
            for done, event in enumerate(unwritten):
                if not self._write(event):
                    self._unwritten = unwritten[done:]
                    break
            else:
                self._unwritten = []
        self._hand_over()

    def _write(self, event: Record) -> bool:
        """Append one event to the active segment, rolling to a new one when it is full."""
        frame = encode_record(*event)
        writer = self._writer
        try:
            if not writer.fits(len(frame)):
                self._hand_over()  # what was written so far ends in this segment
                writer.roll(len(frame))
            writer.append(frame)
        except OSError:
            if not self._unwritten:
                log.exception("usage: cannot write the spool; keeping events in memory")
            return False
        self._written.append(event)
        self._flushed += 1
        return True

    def _hand_over(self) -> None:
        records = self._written
        if records:
            self._written = []
            self._sender.written(self._writer.segno, self._writer.offset, records)
            self._sync_wakeup.set()

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._sync_wakeup.wait()
            started = loop.time()
            self._sync_wakeup.clear()
            flushed = self._flushed
            try:
                await loop.run_in_executor(self._thread, self._writer.sync)
            except OSError:
                log.exception("usage: fsync of the spool failed")
                await asyncio.sleep(self._retry_delay)
                self._sync_wakeup.set()
                continue
            self._settle_durable(flushed)
            # Group commit: the writes of the next `sync_interval` share one fsync.
            await asyncio.sleep(started + self._sync_interval - loop.time())

    def _settle_durable(self, flushed: int) -> None:
        self._durable = flushed
        waiting = []
        for target, future in self._durable_waiters:
            if target > flushed:
                waiting.append((target, future))
            elif not future.done():
                future.set_result(None)
        self._durable_waiters = waiting
