"""The SSE splitter and encoder: whole events out of any chunking, raw bytes kept as received."""

from __future__ import annotations

import random
import re

import pytest

from gateway.sse import SseError, SseEvent, SseSplitter, encode_event


def split_all(chunks: list[bytes]) -> list[SseEvent]:
    splitter = SseSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    return events + splitter.finish()


def test_lf_events_with_names_and_raw_bytes() -> None:
    stream = b'event: token\ndata: {"text": "Hel"}\n\nevent: end\ndata: {"text": "Hel"}\n\n'
    events = split_all([stream])
    assert events == [
        SseEvent(b"token", b'{"text": "Hel"}', b'event: token\ndata: {"text": "Hel"}\n\n'),
        SseEvent(b"end", b'{"text": "Hel"}', b'event: end\ndata: {"text": "Hel"}\n\n'),
    ]
    assert b"".join(event.raw for event in events) == stream


def test_crlf_events() -> None:
    stream = b"event: token\r\ndata: a\r\n\r\nevent: token\r\ndata: b\r\n\r\n"
    events = split_all([stream])
    assert [(e.name, e.data) for e in events] == [(b"token", b"a"), (b"token", b"b")]
    assert b"".join(event.raw for event in events) == stream


def test_cr_only_and_mixed_line_ends() -> None:
    events = split_all([b"data: a\r\rdata: b\n\r\ndata: c\r\n\n"])
    assert [e.data for e in events] == [b"a", b"b", b"c"]
    assert [e.raw for e in events] == [b"data: a\r\r", b"data: b\n\r\n", b"data: c\r\n\n"]


def test_a_lone_cr_at_the_end_waits_for_the_next_byte_or_the_end() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r\n\r") == []  # maybe half of a CRLF
    assert splitter.feed(b"\n") == [SseEvent(b"message", b"a", b"data: a\r\n\r\n")]
    assert splitter.feed(b"data: b\r\r") == []
    assert splitter.finish() == [SseEvent(b"message", b"b", b"data: b\r\r")]


def test_event_split_across_chunks_at_every_byte() -> None:
    stream = b"event: token\r\ndata: {\"text\": \"x\"}\r\n\r\n"
    for cut in range(1, len(stream)):
        assert split_all([stream[:cut], stream[cut:]]) == split_all([stream]), cut


def test_multiple_data_lines_join_with_lf() -> None:
    [event] = split_all([b"event: end\ndata: line one\ndata:line two\ndata\n\n"])
    assert event == SseEvent(b"end", b"line one\nline two\n",
                             b"event: end\ndata: line one\ndata:line two\ndata\n\n")


def test_comments_and_pings_are_skipped() -> None:
    events = split_all([b": ping\n\n: hello\nevent: token\n: mid-event comment\ndata: t\n\n"])
    assert events == [SseEvent(b"token", b"t",
                               b": hello\nevent: token\n: mid-event comment\ndata: t\n\n")]


def test_missing_event_name_is_message_and_other_fields_are_ignored() -> None:
    events = split_all([b"id: 7\nretry: 10\ndata: x\n\nevent:\ndata: y\n\n"])
    assert [(e.name, e.data) for e in events] == [(b"message", b"x"), (b"message", b"y")]


def test_only_one_leading_space_is_removed() -> None:
    [event] = split_all([b"data:  two spaces\n\n"])
    assert event.data == b" two spaces"


def test_events_without_data_are_not_dispatched() -> None:
    assert split_all([b"event: end\n\n\n\n\nid: 3\n\n"]) == []


def test_stray_blank_lines_are_not_part_of_the_next_event() -> None:
    events = split_all([b"data: a\n\n\n\ndata: b\n\n", b"\r\n\r\ndata: c\r\n\r\n"])
    assert [e.raw for e in events] == [b"data: a\n\n", b"data: b\n\n", b"data: c\r\n\r\n"]


def test_byte_order_mark_is_dropped_even_when_split() -> None:
    events = split_all([b"\xef", b"\xbb\xbfdata: a\n\n"])
    assert events == [SseEvent(b"message", b"a", b"data: a\n\n")]


def test_saw_error() -> None:
    splitter = SseSplitter()
    splitter.feed(b"event: token\ndata: 1\n\n")
    assert not splitter.saw_error
    splitter.feed(b'event: error\ndata: {"code": "x"}\n\n')
    assert splitter.saw_error


def test_an_event_larger_than_the_limit_is_refused() -> None:
    splitter = SseSplitter(max_event_bytes=1024)
    splitter.feed(b"data: " + b"x" * 1000)
    with pytest.raises(SseError):
        splitter.feed(b"x" * 100)


def test_encode_event() -> None:
    assert encode_event(b"token", b'{"text":"a"}') == b'event: token\ndata: {"text":"a"}\n\n'
    assert encode_event(b"end", b"") == b"event: end\ndata: \n\n"
    assert encode_event(b"end", b"a\r\nb\nc") == b"event: end\ndata: a\ndata: b\ndata: c\n\n"
    with pytest.raises(ValueError):
        encode_event(b"to\nken", b"x")


@pytest.mark.parametrize("data", [b"x", b"", b"a\nb", b"a\r\nb\rc", b"\n", b" lead", b":colon"])
def test_encode_then_split_round_trips(data: bytes) -> None:
    raw = encode_event(b"token", data)
    expected = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert split_all([raw]) == [SseEvent(b"token", expected, raw)]


def _random_stream(rng: random.Random) -> bytes:
    ends = [b"\n", b"\r\n", b"\r"]
    parts: list[bytes] = []
    for _ in range(rng.randint(1, 30)):
        eol = rng.choice(ends)
        if rng.random() < 0.2:
            parts.append(b": ping" + eol)
        if rng.random() < 0.7:
            parts.append(b"event: " + rng.choice([b"token", b"end", b"error"]) + eol)
        for _ in range(rng.randint(0, 3)):
            text = bytes(rng.choice(b"ab {}\":,\xc3\xa9") for _ in range(rng.randint(0, 12)))
            parts.append(b"data:" + rng.choice([b" ", b""]) + text + eol)
        parts.append(eol * rng.randint(1, 2))
    return b"".join(parts)


def _reference(stream: bytes) -> list[tuple[bytes, bytes]]:
    """The spec's algorithm, line by line, written as plainly as possible."""
    events: list[tuple[bytes, bytes]] = []
    name, data = b"", b""
    for line in re.split(rb"\r\n|\r|\n", stream)[:-1]:  # the stream ends with a line end
        if not line:
            if data:
                events.append((name or b"message", data[:-1]))
            name, data = b"", b""
            continue
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"event":
            name = value
        elif field == b"data":
            data += value + b"\n"
    return events


def test_random_chunkings_give_the_same_events() -> None:
    rng = random.Random(20240611)
    for _ in range(400):
        stream = _random_stream(rng)
        whole = split_all([stream])
        assert [(event.name, event.data) for event in whole] == _reference(stream), stream
        for _ in range(8):
            count = min(len(stream) - 1, rng.randint(1, 12))
            cuts = sorted(rng.sample(range(1, len(stream)), count))
            pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
            assert split_all(pieces) == whole, (stream, cuts)
        one_byte = split_all([stream[i:i + 1] for i in range(len(stream))])
        assert one_byte == whole, stream
