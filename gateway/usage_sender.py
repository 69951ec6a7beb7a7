"""The sending half of the usage emitter: delivers the spooled records to Kafka, in order.

The sender works in rounds: what accumulated (at most `round_max_events`), one batch per
partition, and only a round Kafka acknowledged moves the spool's acknowledgement point. While
delivery works, records come from memory (`written()` hands each flush over). When a round
fails, the in-memory copies are dropped and the sender reads the spool file from the
acknowledgement point, resending the failed round first, with jittered backoff; it goes back to
memory once it has caught up with the writer. Spools of dead workers are adopted and replayed
first (they hold older events). Sending a round to Kafka is `usage_kafka`'s part.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gateway.spool import (
    AckedMark,
    Decoded,
    Orphan,
    Record,
    SegmentWriter,
    adopt_orphans,
    read_segment,
    release,
    segment_path,
)
from gateway.usage_kafka import KafkaLink, KafkaSettings

log = logging.getLogger("sitekit.gateway.usage")

@dataclass(slots=True)
class UsageCounters:
    """Monotonic counters, plus `depth`: events taken and not yet acknowledged by Kafka."""

    accepted: int = 0  # emit() calls taken
    sent: int = 0  # acknowledged straight from memory
    spooled: int = 0  # missed the live path and waited on disk for Kafka
    replayed: int = 0  # acknowledged after being read back from a spool file
    failed: int = 0  # records in rounds Kafka did not acknowledge (each retry counts)
    dropped: int = 0  # refused by emit() or not encodable: lost
    rounds: int = 0  # rounds Kafka acknowledged (one request per partition each)
    depth: int = 0


@dataclass(slots=True)
class _Chunk:
    """One flush's records; they end at `end` in segment `segno`."""

    segno: int
    end: int
    records: list[Record]


@dataclass(slots=True)
class _Stretch:
    """Records read back from a segment, served round by round."""

    segno: int
    decoded: Decoded
    sealed: bool  # the whole rest of the segment: once served, go on to the next one
    index: int = 0


@dataclass(slots=True)
class _Round:
    records: list[Record]
    commit: Callable[[], None]  # called once Kafka acknowledged every record
    from_disk: bool


class UsageSender:
    def __init__(
        self, writer: SegmentWriter, kafka: KafkaSettings, counters: UsageCounters,
        thread: ThreadPoolExecutor, *, round_max_events: int, max_memory_events: int,
        backoff_min: float, backoff_max: float, adopt_interval: float, round_interval: float,
    ) -> None:
        self._counters, self._thread = counters, thread
        self._round_interval = round_interval
        self._kafka = KafkaLink(kafka)
        self._dir, self._owner = writer.directory, writer.owner
        self._round_max, self._max_memory = round_max_events, max_memory_events
        self._backoff_min, self._backoff_max = backoff_min, backoff_max
        self._adopt_interval = adopt_interval
        self._live = True  # the next records to send are in _queue, not only on disk
        self._queue: deque[_Chunk] = deque()
        self._queued = 0
        self.cursor = (0, 0)  # own spool: the position after the last acknowledged record
        self._handed = (0, 0)  # own spool: the end of the last records handed to `written()`
        self._oldest_segno = 0
        self.acked_mark = AckedMark(self._dir, self._owner)
        self._stretch: _Stretch | None = None
        self.orphans: deque[Orphan] = deque()
        self._orphan_stretch: _Stretch | None = None
        self.closing = False
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()  # nothing left to send: everything written is acknowledged
        self.stalled = asyncio.Event()  # closing, and a round failed: stop draining

    @property
    def connected(self) -> bool:
        """The last round reached Kafka."""
        return self._kafka.connected

    async def discard_producer(self) -> None:
        await self._kafka.discard()

    def written(self, segno: int, end: int, records: list[Record]) -> None:
        """The flush appended `records` to the spool, ending at (segno, end)."""
        self._handed = (segno, end)
        if self._live:
            self._queue.append(_Chunk(segno, end, records))
            self._queued += len(records)
            if self._queued > self._max_memory:  # Kafka is slow: read them from disk later
                self._leave_memory()
        else:
            self._counters.spooled += len(records)
        self.idle.clear()
        self.wakeup.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff, next_adoption = self._backoff_min, 0.0
        while True:
            try:
                if loop.time() >= next_adoption:
                    next_adoption = loop.time() + self._adopt_interval
                    self._adopt()
                self.wakeup.clear()  # before looking, so that no wake-up is missed
                started = loop.time()
                batch = await self._next_round()
                if batch is None:
                    self.idle.set()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._adopt_interval):
                            await self.wakeup.wait()
                    continue
                if await self._kafka.deliver(batch.records):
                    self._acknowledged(batch)
                    backoff = self._backoff_min
                    await self._gather(started + self._round_interval)
                    continue
                self._counters.failed += len(batch.records)
                if not batch.from_disk:
                    self._counters.spooled += len(batch.records)
                self._leave_memory()
                await self.discard_producer()
            except Exception:  # a bug here must not stop delivery for good
                log.exception("usage: sender failed; retrying")
                self._leave_memory()
            if self.closing:  # Kafka is not taking them: leave the rest in the spool
                self.stalled.set()
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, self._backoff_max)

    async def _gather(self, until: float) -> None:
        """Let the next live round gather events until `until`: a Kafka request per flush (every
        few ms) would cost more than the events it carries at moderate rates. The events wait in
        the spool meanwhile, as durable as ever; a full round, a backlog on disk, or closing goes
        at once."""
        delay = until - asyncio.get_running_loop().time()
        if delay > 0 and self._live and not self.closing and self._queued < self._round_max:
            await asyncio.sleep(delay)

    def _acknowledged(self, batch: _Round) -> None:
        batch.commit()
        self._counters.rounds += 1
        count = len(batch.records)
        self._counters.depth -= count
        if batch.from_disk:
            self._counters.replayed += count
        else:
            self._counters.sent += count

    def _leave_memory(self) -> None:
        """Drop the in-memory copies: from here on the sender reads the spool file."""
        if self._live:
            self._counters.spooled += self._queued
            self._queue.clear()
            self._queued = 0
            self._live = False

    async def _next_round(self) -> _Round | None:
        while self.orphans:
            batch = await self._orphan_round(self.orphans[0])
            if batch is not None:
                return batch
        while True:
            stretch = self._stretch
            if stretch is not None and stretch.index < len(stretch.decoded.records):
                return self._stretch_round(stretch, own=True)
            if self._live:
                return self._memory_round()
            await self._read_own()

    def _memory_round(self) -> _Round | None:
        if not self._queue:
            return None
        records: list[Record] = []
        while self._queue and len(records) < self._round_max:
            last = self._queue.popleft()
            records.extend(last.records)
        self._queued -= len(records)
        return _Round(records, lambda: self._advance(last.segno, last.end), False)

    async def _read_own(self) -> None:
        """Read our spool on from the cursor; once that reaches what the flush handed over
        (records written after it are handed over next), go live again."""
        segno, offset = self.cursor
        handed_segno, handed_end = self._handed
        if (segno, offset) >= self._handed:
            self._live, self._stretch = True, None
            return
        sealed = segno < handed_segno  # the writer moves on only once all of it was handed over
        end = None if sealed else handed_end
        path = segment_path(self._dir, self._owner, segno)
        decoded = await self._read(path, offset, end)
        if decoded.records:
            self._stretch = _Stretch(segno, decoded, sealed)
            # Nothing was handed over during the read: what comes next queues behind it.
            self._live = not sealed and self._handed == (segno, end)
        elif end is None:
            self._advance(segno + 1, 0)
        else:  # only damaged bytes up to the writer: skip them
            self._advance(segno, end)

    async def _orphan_round(self, orphan: Orphan) -> _Round | None:
        stretch = self._orphan_stretch
        if stretch is not None and stretch.index < len(stretch.decoded.records):
            return self._stretch_round(stretch, own=False)
        if not orphan.segments:
            release(self._dir, orphan.owner, orphan.lock_fd, remove=True)
            self.orphans.popleft()
            log.info("usage: replayed the spool of %s", orphan.owner)
            return None
        segno, path = orphan.segments[0]
        acked_segno, acked_offset = orphan.acked or (-1, 0)
        decoded = Decoded()
        if segno >= acked_segno:
            decoded = await self._read(path, acked_offset if segno == acked_segno else 0, None)
        self._counters.depth += len(decoded.records)
        self._orphan_stretch = _Stretch(segno, decoded, True)
        if not decoded.records:
            self._orphan_served()
        return None

    def _orphan_served(self) -> None:
        self._remove(self.orphans[0].segments.pop(0)[1])
        self._orphan_stretch = None

    def _stretch_round(self, stretch: _Stretch, *, own: bool) -> _Round:
        start = stretch.index
        stop = min(start + self._round_max, len(stretch.decoded.records))

        def commit() -> None:
            stretch.index = stop
            done = stop == len(stretch.decoded.records)
            if not own:
                if done:
                    self._orphan_served()
            elif done and stretch.sealed:
                self._advance(stretch.segno + 1, 0)
            else:
                self._advance(stretch.segno, stretch.decoded.ends[stop - 1])

        return _Round(stretch.decoded.records[start:stop], commit, True)

    def _advance(self, segno: int, offset: int) -> None:
        """Acknowledged up to (segno, offset): delete older segments, note it for restarts."""
        self.cursor = (segno, offset)
        while self._oldest_segno < segno:
            self._remove(segment_path(self._dir, self._owner, self._oldest_segno))
            self._oldest_segno += 1
        self.acked_mark.write(segno, offset)

    def _remove(self, path: Path) -> None:
        """Delete a replayed segment on the disk thread: freeing a file's blocks can take a
        millisecond, a stall every segment on the event loop."""
        self._thread.submit(_unlink, path)

    def _adopt(self) -> None:
        held = {self._owner, *(orphan.owner for orphan in self.orphans)}
        found = adopt_orphans(self._dir, held)
        if found:
            log.warning("usage: replaying spools of dead workers: %s", [o.owner for o in found])
            self.orphans.extend(found)
            self.idle.clear()

    async def _read(self, path: Path, offset: int, end: int | None) -> Decoded:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, read_segment, path, offset, end)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.exception("usage: cannot delete the replayed spool segment %s", path)
