"""The spool file format, the segment writer, and the lock protocol that adopts dead spools."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.spool import (
    AckedMark,
    SegmentFull,
    SegmentWriter,
    adopt_orphans,
    decode_records,
    encode_record,
    lock_owner,
    read_acked,
    read_segment,
    release,
    segment_path,
    segments,
)


def sample(count: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [(f"tenant-{i % 3}".encode(), f'{{"id":"event-{i}"}}'.encode() * (1 + i % 4))
            for i in range(start, start + count)]


def written_segment(directory: Path, records: list[tuple[bytes, bytes]]) -> Path:
    writer = SegmentWriter(directory, "owner.1.abc")
    writer.open()
    for record in records:
        writer.append(encode_record(*record))
    writer.close()
    return segment_path(directory, "owner.1.abc", 0)


def test_records_read_back_in_append_order(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, "owner.1.abc")
    writer.open()
    first, second = sample(10), sample(25, start=10)
    writer.append(b"".join(encode_record(*r) for r in first))
    middle = writer.offset
    writer.append(b"".join(encode_record(*r) for r in second))
    writer.sync()
    path = segment_path(tmp_path, "owner.1.abc", 0)

    decoded = read_segment(path)
    assert decoded.records == first + second
    assert (decoded.torn, decoded.corrupt) == (0, 0)
    assert decoded.ends == sorted(decoded.ends) and decoded.ends[-1] == writer.offset
    assert decoded.ends[9] == middle
    # Reading on from an acknowledgement point gives exactly the rest.
    assert read_segment(path, middle).records == second
    assert read_segment(path, decoded.ends[0], middle).records == first[1:]
    writer.close()


def test_roll_opens_the_next_segment(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, "owner.1.abc")
    writer.open()
    writer.append(encode_record(b"t", b"one"))
    writer.roll()
    writer.append(encode_record(b"t", b"two"))
    writer.close()
    assert [segno for segno, _ in segments(tmp_path, "owner.1.abc")] == [0, 1]
    assert [read_segment(p).records for _, p in segments(tmp_path, "owner.1.abc")] == [
        [(b"t", b"one")], [(b"t", b"two")]]


def test_a_torn_last_record_is_skipped(tmp_path: Path) -> None:
    records = sample(5)
    path = written_segment(tmp_path, records)
    data = path.read_bytes()
    last = len(encode_record(*records[-1]))
    # Cut inside the last record's header, and inside its body: what a crash mid-write leaves.
    for cut in (3, 12, last - 1):
        decoded = decode_records(data[: len(data) - cut])
        assert decoded.records == records[:-1]
        assert decoded.torn == last - cut
        assert decoded.corrupt == 0


def test_a_checksum_mismatch_is_detected_and_the_rest_recovered(tmp_path: Path) -> None:
    records = sample(6)
    path = written_segment(tmp_path, records)
    data = bytearray(path.read_bytes())
    sizes = [len(encode_record(*r)) for r in records]
    flipped = sum(sizes[:2]) + sizes[2] - 2  # a byte inside the third record's value
    data[flipped] ^= 0xFF

    decoded = decode_records(bytes(data))
    assert decoded.records == records[:2] + records[3:]
    assert decoded.corrupt == sizes[2]
    assert decoded.torn == 0


def test_a_zero_filled_tail_is_unwritten_space(tmp_path: Path) -> None:
    # A segment is made at its full size: the part never written reads as zeros.
    records = sample(4)
    data = written_segment(tmp_path, records).read_bytes() + bytes(300)
    decoded = decode_records(data)
    assert decoded.records == records
    assert (decoded.torn, decoded.corrupt) == (0, 0)


def test_a_record_cut_short_before_the_zeros_is_torn(tmp_path: Path) -> None:
    # A kill -9 in the middle of copying a record into the map: its frame is there, the rest
    # of it is not (zeros, or less than its length says).
    records = sample(4)
    data = written_segment(tmp_path, records).read_bytes()
    last = len(encode_record(*records[-1]))
    for kept in (3, 13, last - 2):  # each ends in a byte that is not zero
        decoded = decode_records(data[: len(data) - last + kept] + bytes(4096))
        assert decoded.records == records[:-1]
        assert (decoded.torn, decoded.corrupt) == (kept, 0)


def test_a_live_segment_is_full_size_and_cut_to_its_records_when_retired(
    tmp_path: Path,
) -> None:
    writer = SegmentWriter(tmp_path, "owner.1.abc", segment_bytes=4096)
    writer.open()
    first = segment_path(tmp_path, "owner.1.abc", 0)
    assert first.stat().st_size == 4096
    writer.append(encode_record(b"t", b"one"))
    assert writer.fits(4096 - writer.offset) and not writer.fits(4097 - writer.offset)
    # Written through the map, the record is in the file at once: no write or sync yet.
    assert read_segment(first).records == [(b"t", b"one")]
    big = encode_record(b"t", b"x" * 5000)
    with pytest.raises(SegmentFull):
        writer.append(big)
    writer.roll(len(big))  # a record larger than a segment gets a segment of its own size
    writer.append(big)
    writer.close()
    assert first.stat().st_size == len(encode_record(b"t", b"one"))
    assert read_segment(segment_path(tmp_path, "owner.1.abc", 1)).records == [
        (b"t", b"x" * 5000)]
    assert segment_path(tmp_path, "owner.1.abc", 1).stat().st_size == len(big)


def test_a_live_owner_is_never_adopted(tmp_path: Path) -> None:
    fd = lock_owner(tmp_path, "alive.1.abc")
    written_segment(tmp_path, sample(3))  # owner.1.abc: no lock file at all
    try:
        assert adopt_orphans(tmp_path, skip=set()) == []
    finally:
        os.close(fd)


def test_a_dead_owner_is_adopted_once_and_released(tmp_path: Path) -> None:
    fd = lock_owner(tmp_path, "owner.1.abc")
    written_segment(tmp_path, sample(3))
    mark = AckedMark(tmp_path, "owner.1.abc")
    mark.write(0, 42)
    mark.close()
    os.close(fd)  # the process died: the kernel dropped its lock

    orphans = adopt_orphans(tmp_path, skip=set())
    assert [(o.owner, [s for s, _ in o.segments], o.acked) for o in orphans] == [
        ("owner.1.abc", [0], (0, 42))]
    assert adopt_orphans(tmp_path, skip=set()) == []  # held by us now: nobody else takes it

    release(tmp_path, "owner.1.abc", orphans[0].lock_fd, remove=True)
    assert os.listdir(tmp_path) == []


def test_the_acked_hint_is_checked(tmp_path: Path) -> None:
    assert read_acked(tmp_path, "owner.1.abc") is None
    mark = AckedMark(tmp_path, "owner.1.abc")
    mark.write(2, 99)
    mark.write(3, 1234)  # rewritten in place
    mark.close()
    assert read_acked(tmp_path, "owner.1.abc") == (3, 1234)
    path = tmp_path / "owner.1.abc.acked"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert read_acked(tmp_path, "owner.1.abc") is None
