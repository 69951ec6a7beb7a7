"""The usage spool: append-only segment files of checksummed records, one owner per process.

A record is `MAGIC | body length (u32) | crc32 of body (u32) | body`, the body being
`key length (u16) | key | value`, all little-endian. The magic lets a reader find the next
record after a damaged one; the checksum tells a damaged record from a good one.

Files in the spool directory, `owner` being `<instance>.<pid>.<random>` (unique per start):

    <owner>.lock              flock(LOCK_EX) held by the live owner, or by whoever adopted it
    <owner>.<segno>.seg       the owner's segments, written in order, deleted once acknowledged;
                              the active one is mapped into memory at its full size (its
                              unwritten rest is zeros) and cut to its length when retired
    <owner>.acked             where acknowledgement had reached (segno, offset): a hint, so a
                              restart resends fewer duplicates; stale is safe, never ahead

A process whose lock is free is dead: any worker may take the lock and replay its segments.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sitekit.gateway.usage")

MAGIC = b"\xa7\x5c"
_HEADER = struct.Struct("<2sII")
_KEY_LENGTH = struct.Struct("<H")
_ACKED = struct.Struct("<QQI")
MAX_BODY = 1 << 20  # a usage event is ~400 bytes; anything larger is a damaged length field

Record = tuple[bytes, bytes]  # (Kafka key, value)


def encode_record(key: bytes, value: bytes) -> bytes:
    body = _KEY_LENGTH.pack(len(key)) + key + value
    return _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


@dataclass(slots=True)
class Decoded:
    """Records found in a buffer, with the file offset just after each one."""

    records: list[Record] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    torn: int = 0  # bytes of an incomplete last record: the writer died mid-write
    corrupt: int = 0  # bytes skipped over because a checksum or the framing was wrong


def decode_records(buf: bytes, base: int = 0) -> Decoded:
    """Every valid record of `buf` (which starts at file offset `base`), in order."""
    out = Decoded()
    pos, size = 0, len(buf)
    while pos < size:
        state = _check(buf, pos)
        if isinstance(state, int):
            key_length = _KEY_LENGTH.unpack_from(buf, pos + _HEADER.size)[0]
            start = pos + _HEADER.size + _KEY_LENGTH.size
            out.records.append((buf[start:start + key_length], buf[start + key_length:state]))
            out.ends.append(base + state)
            pos = state
            continue
        following = _resync(buf, pos + 1)
        if following is None:
            # Nothing valid after this point. Zeros are the part of a segment never written
            # (segments are made at full size). Before them, a last record cut short (too
            # short for its length, or framed but failing its checksum) is what a crash
            # mid-copy leaves; anything else is damage.
            if state == "incomplete":
                out.torn += size - pos
            elif written := len(buf[pos:].rstrip(b"\0")):
                if buf.startswith(MAGIC, pos):
                    out.torn += written
                else:
                    out.corrupt += written
            break
        out.corrupt += following - pos
        pos = following
    return out


def _check(buf: bytes, pos: int) -> int | str:
    """The end offset of the valid record at `pos`, else why it is not one."""
    if len(buf) - pos < _HEADER.size:
        return "incomplete"
    magic, length, crc = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC or not _KEY_LENGTH.size <= length <= MAX_BODY:
        return "bad"
    end: int = pos + _HEADER.size + length
    if end > len(buf):
        return "incomplete"
    body = memoryview(buf)[pos + _HEADER.size:end]
    if zlib.crc32(body) != crc or _KEY_LENGTH.unpack_from(body)[0] > length - _KEY_LENGTH.size:
        return "bad"
    return end


def _resync(buf: bytes, start: int) -> int | None:
    while (candidate := buf.find(MAGIC, start)) >= 0:
        if isinstance(_check(buf, candidate), int):
            return candidate
        start = candidate + 1
    return None


def read_segment(path: Path, offset: int = 0, end: int | None = None) -> Decoded:
    """Decode a segment from `offset` to `end` (or its end); runs on a worker thread."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if end is None else f.read(end - offset)
    except FileNotFoundError:  # removed behind our back: nothing to replay from it
        log.error("spool segment %s vanished", path)
        return Decoded()
    decoded = decode_records(data, offset)
    if decoded.torn or decoded.corrupt:
        log.error("spool segment %s: skipped %d damaged and %d torn bytes",
                  path, decoded.corrupt, decoded.torn)
    return decoded


_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def new_owner(instance: str) -> str:
    """A spool owner name no earlier process used, so a restart never reopens old files."""
    return f"{_SAFE.sub('_', instance) or 'gateway'}.{os.getpid()}.{secrets.token_hex(3)}"


def segment_path(directory: Path, owner: str, segno: int) -> Path:
    return directory / f"{owner}.{segno:010d}.seg"


def segments(directory: Path, owner: str) -> list[tuple[int, Path]]:
    """The owner's segments as (segno, path), oldest first."""
    prefix = owner + "."
    found = []
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".seg"):
            number = name[len(prefix):-len(".seg")]
            if number.isdigit():
                found.append((int(number), directory / name))
    return sorted(found)


class SegmentFull(ValueError):
    """The record does not fit in the rest of the active segment: roll first."""


class SegmentWriter:
    """Appends to the owner's active segment through a shared memory map of it: an append is a
    copy into the page cache, with no system call, and it belongs to the file as soon as it is
    copied, so a kill -9 of the process one instruction later loses nothing (only a crash of the
    machine can, before `sync`). A segment is created at its full size with its blocks reserved
    (posix_fallocate), so a full disk fails the roll with an OSError instead of a write into the
    map killing the process; what was never written reads as zeros, which readers take as the
    end. A retired or closed segment is cut to its written length. `sync` (fsync) runs on a
    worker thread."""

    def __init__(self, directory: Path, owner: str, segment_bytes: int = 4 << 20) -> None:
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be positive")
        self.directory = directory
        self.owner = owner
        self.segno = -1
        self.offset = 0
        self._segment_bytes = segment_bytes
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._size = 0
        self._retired: list[tuple[int, mmap.mmap, int]] = []  # (fd, map, length) to cut, sync
        self._new_dirent = False
        self._lock = threading.Lock()

    def open(self) -> None:
        fd, mapped = self._create(0, self._segment_bytes)
        with self._lock:
            self._fd, self._map, self._size = fd, mapped, self._segment_bytes
            self.segno, self.offset, self._new_dirent = 0, 0, True

    def fits(self, size: int) -> bool:
        return self.offset + size <= self._size

    def append(self, data: bytes) -> None:
        """Copy `data` into the active segment; `SegmentFull` if it does not fit."""
        start = self.offset
        end = start + len(data)
        if end > self._size or self._map is None:
            raise SegmentFull(f"{len(data)} bytes do not fit in segment {self.segno}")
        self._map[start:end] = data
        self.offset = end

    def roll(self, need: int = 0) -> None:
        """Start the next segment, large enough for a record of `need` bytes."""
        size = max(self._segment_bytes, need)
        fd, mapped = self._create(self.segno + 1, size)  # if this fails, the old one stays
        with self._lock:
            if self._map is not None:
                self._retired.append((self._fd, self._map, self.offset))
            self._fd, self._map, self._size = fd, mapped, size
            self.segno, self.offset, self._new_dirent = self.segno + 1, 0, True

    def sync(self) -> None:
        """Make everything appended so far durable; called from one worker thread at a time."""
        with self._lock:
            retired, self._retired = self._retired, []
            active, new_dirent, self._new_dirent = self._fd, self._new_dirent, False
        for fd, mapped, length in retired:
            mapped.close()
            os.ftruncate(fd, length)
            os.fsync(fd)
            os.close(fd)
        if active >= 0:
            os.fsync(active)  # on Linux this writes the pages dirtied through the map too
        if new_dirent:  # a new file's name is only durable once its directory is synced
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._retired.append((self._fd, self._map, self.offset))
            self._fd, self._map, self._size = -1, None, 0
        self.sync()

    def _create(self, segno: int, size: int) -> tuple[int, mmap.mmap]:
        path = segment_path(self.directory, self.owner, segno)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            mapped = mmap.mmap(fd, size)
            # Read the first page in before a record is copied there. The first write through
            # the map into a fresh segment otherwise takes a major page fault: the roll and its
            # first record held the event loop for 1.1-1.4 ms here, against 0.24-0.32 ms with
            # this read (loadtest/bench_usage.py, segment_roll_ms, three runs each).
            os.pread(fd, 1, 0)
            return fd, mapped
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise


def lock_owner(directory: Path, owner: str) -> int:
    """Take the new owner's lock. The lock is held before its name appears (rename), so no
    other worker can ever mistake a live owner for a dead one."""
    temporary = directory / f"{owner}.lock.new"
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(temporary, directory / f"{owner}.lock")
    return fd


@dataclass(slots=True)
class Orphan:
    """A dead owner's spool, locked by us until every segment is replayed and deleted."""

    owner: str
    lock_fd: int
    segments: list[tuple[int, Path]]
    acked: tuple[int, int] | None


def adopt_orphans(directory: Path, skip: set[str]) -> list[Orphan]:
    """Lock the spools of dead owners (their lock is free), oldest first."""
    orphans = []
    for name in os.listdir(directory):
        owner = name[: -len(".lock")]
        if not name.endswith(".lock") or owner in skip:
            continue
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The last adopter may have unlinked the name between our open and our flock.
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)
        except OSError:  # BlockingIOError: alive; FileNotFoundError: already released
            os.close(fd)
            continue
        found = segments(directory, owner)
        orphans.append(Orphan(owner, fd, found, read_acked(directory, owner)))
    orphans.sort(key=lambda o: min((p.stat().st_mtime for _, p in o.segments), default=0.0))
    return orphans


def release(directory: Path, owner: str, lock_fd: int, *, remove: bool) -> None:
    """Give up an owner's lock; with `remove`, its spool is empty: delete what is left of it."""
    if remove:
        for _, path in segments(directory, owner):
            path.unlink(missing_ok=True)
        (directory / f"{owner}.acked").unlink(missing_ok=True)
        (directory / f"{owner}.lock").unlink(missing_ok=True)  # only while holding the lock
    os.close(lock_fd)


class AckedMark:
    """The owner's acknowledgement point, rewritten in place after every acknowledged round
    (one pwrite, ~1 µs). Not fsynced: a stale value after a crash only means duplicates."""

    def __init__(self, directory: Path, owner: str) -> None:
        self._path = directory / f"{owner}.acked"
        self._fd = -1

    def write(self, segno: int, offset: int) -> None:
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        head = struct.pack("<QQ", segno, offset)
        os.pwrite(self._fd, head + struct.pack("<I", zlib.crc32(head)), 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_acked(directory: Path, owner: str) -> tuple[int, int] | None:
    try:
        data = (directory / f"{owner}.acked").read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != _ACKED.size:
        return None
    segno, offset, crc = _ACKED.unpack(data)
    return (segno, offset) if zlib.crc32(data[:16]) == crc else None
