"""Server-Sent Events on the bytes level: split the runtime's stream into whole events, keeping
each event's raw bytes so token events can be forwarded as they came, and encode our own.

Parsing follows the WHATWG event-stream rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or CR; a blank line ends an event; `:` starts a comment; `data` lines join
with LF; an event without `event:` is a `message`; an event without data is not dispatched.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class SseError(ValueError):
    """The stream broke the limits of the splitter (an event larger than `max_event_bytes`)."""


class SseEvent(NamedTuple):
    name: bytes
    data: bytes
    raw: bytes  # the event's bytes as received, blank line included


_BOM = b"\xef\xbb\xbf"
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# Two line ends in a row, each CRLF, CR or LF; a CR is never the first half of a CRLF.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


class SseSplitter:
    """Feed it the stream's chunks in order; it returns the events each chunk completed."""

    __slots__ = ("_buffer", "_scanned", "_started", "max_event_bytes", "saw_error")

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        self._buffer = b""
        self._scanned = 0  # bytes of _buffer already known to hold no event end
        self._started = False
        self.max_event_bytes = max_event_bytes
        self.saw_error = False  # an `error` event went by

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if not self._started:
            if len(buffer) < 3 and _BOM.startswith(buffer):
                self._buffer = buffer  # maybe the start of a byte order mark
                return []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[3:]
        if b"\r" in buffer:
            events, rest = self._split_any(buffer)
        else:
            events, rest = self._split_lf(buffer)
        if len(rest) > self.max_event_bytes:
            raise SseError(f"an event exceeds {self.max_event_bytes} bytes")
        self._buffer = rest
        return events

    def finish(self) -> list[SseEvent]:
        """Events still held at the end of the stream: only one ended by a lone CR can be."""
        buffer, self._buffer, self._scanned = self._buffer, b"", 0
        if buffer.endswith(b"\r"):
            events, _ = self._split_any(buffer + b"\n", final=True)
            return events
        return []

    def _split_lf(self, buffer: bytes) -> tuple[list[SseEvent], bytes]:
        # The common case, with no CR anywhere: events end at b"\n\n".
        events: list[SseEvent] = []
        start = 0
        find = buffer.find
        end = find(b"\n\n", max(self._scanned - 1, 0))
        while end >= 0:
            while start < end and buffer[start] == 0x0A:  # stray blank lines before an event
                start += 1
            raw = buffer[start:end + 2]
            eol = raw.find(b"\n")
            if (eol > 7 and raw.startswith(b"event: ") and raw.startswith(b"data: ", eol + 1)
                    and raw.find(b"\n", eol + 1) == len(raw) - 2):
                # The runtime's own shape, an `event: ` line and one `data: ` line, is nearly
                # all the traffic: it skips the general line loop, with the same result.
                self._add(events, raw[7:eol], raw[eol + 7:-2], raw)
            else:
                self._collect(events, raw, raw[:-2].split(b"\n"))
            start = end + 2
            end = find(b"\n\n", start)
        rest = buffer[start:]
        self._scanned = len(rest)
        return events, rest

    def _split_any(self, buffer: bytes, *, final: bool = False) -> tuple[list[SseEvent], bytes]:
        events: list[SseEvent] = []
        start = 0
        for match in _EVENT_END.finditer(buffer, max(self._scanned - 3, 0)):
            end = match.end()
            if end == len(buffer) and buffer[end - 1] == 0x0D and not final:
                break  # a CR last in the buffer may be half of a CRLF still on its way
            body_end = match.start()
            while start < body_end and buffer[start] in (0x0A, 0x0D):  # stray blank lines
                start += 1
            raw = buffer[start:end - 1 if final and end == len(buffer) else end]  # no added LF
            self._collect(events, raw, _LINE_BREAK.split(buffer[start:body_end]))
            start = end
        rest = buffer[start:]
        self._scanned = len(rest)
        return events, rest

    def _collect(self, events: list[SseEvent], raw: bytes, lines: list[bytes]) -> None:
        name = b"message"
        data: list[bytes] = []
        for line in lines:
            if not line or line[0] == 0x3A:  # blank, or a `:` comment
                continue
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value or b"message"
        if data:
            self._add(events, name, data[0] if len(data) == 1 else b"\n".join(data), raw)

    def _add(self, events: list[SseEvent], name: bytes, data: bytes, raw: bytes) -> None:
        if name == b"error":
            self.saw_error = True
        events.append(SseEvent(name, data, raw))


def encode_event(name: bytes, data: bytes) -> bytes:
    """One event: `event: <name>`, a `data:` line per line of `data`, and the blank line."""
    if b"\n" in name or b"\r" in name:
        raise ValueError("an event name cannot contain a line break")
    if b"\n" not in data and b"\r" not in data:
        return b"event: " + name + b"\ndata: " + data + b"\n\n"
    lines = _LINE_BREAK.split(data)
    return b"event: " + name + b"\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
