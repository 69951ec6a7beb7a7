"""Stand-ins for the runtime that the gateway's benchmarks run against (`loadtest.bench_stack`
starts them), on raw asyncio protocols:
- the canned runtime answers `POST /flows/<flow>/stream` in the runtime's SSE format, from
  pre-encoded bytes, keep-alive and chunked. `fast`: the whole small answer at once (five tokens
  and `end`); `hold`: the head and one token, then nothing until the client hangs up; `ttft`:
  the first token after `--ttft-ms`, the rest 10 ms later. `GET /stats` counts held streams and
  requests. It serves the same answers over the runtime link (its frames: runtime/link.py) to a
  connection that upgrades with `GET /link`: what the gateway under benchmark uses, while the
  direct baseline keeps to HTTP/1.1;
- the relay (`--relay-to PORT`) does no work at all: each connection is piped byte for byte to
  one connection to PORT. Beside the gateway, it shows what one more hop costs on this machine.

    python -m loadtest.standins --port 18090 [--ttft-ms 20] [--core 1]
    python -m loadtest.standins --port 18091 --relay-to 18090 --core 0
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import signal
import threading
from collections.abc import Callable
from typing import cast

import orjson
import uvloop
from websockets.utils import accept_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # a platform without websockets' C extension
    from websockets.utils import apply_mask

OPEN_FILES = 65536

TOKENS = ("Hel", "lo", ",", " wor", "ld")
USAGE = {"input_tokens": 3, "output_tokens": 5}


def sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
FIRST_TOKEN = sse("token", {"text": TOKENS[0]})
REST = b"".join(sse("token", {"text": t}) for t in TOKENS[1:]) + sse(
    "end", {"text": "".join(TOKENS), "session_id": "bench", "usage": USAGE})
LAST_CHUNK = b"0\r\n\r\n"
FAST_ANSWER = HEAD + chunk(FIRST_TOKEN + REST) + LAST_CHUNK
HOLD_ANSWER = HEAD + chunk(FIRST_TOKEN)
REST_DELAY_S = 0.01
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"

# The link's messages (its frames: runtime/link.py) are `stream id | kind | payload`: all but the
# stream id, which the client chose and which is copied from its OPEN, are constants.
LINK_SUBPROTOCOL = "sitekit-link.1"
OPEN, CANCEL = b"\x01", b"\x02"
NO_STREAM = bytes(4)
LINK_HEAD_OK = b"\x01" + (200).to_bytes(2, "big") + orjson.dumps(
    [["content-type", "text/event-stream; charset=utf-8"]])
LINK_HEAD_NOT_FOUND = b"\x01" + (404).to_bytes(2, "big") + b"[]"
LINK_FAST = b"\x02" + FIRST_TOKEN + REST
LINK_FIRST_TOKEN = b"\x02" + FIRST_TOKEN
LINK_REST = b"\x02" + REST
LINK_END = b"\x03"


@dataclasses.dataclass(slots=True)
class Counters:
    held: int = 0
    requests: int = 0


class CannedRuntime(asyncio.Protocol):
    """One client connection; answers each whole request (head and Content-Length body). A
    `GET /link` request hands the connection, from that request on, to a `CannedLink`."""

    def __init__(self, counters: Counters, ttft_s: float) -> None:
        self.counters = counters
        self.ttft_s = ttft_s
        self.buffer = b""
        self.holding = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.holding:
            self.counters.held -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            if (marker := head.find(b"content-length:")) >= 0:
                stop = head.find(b"\r\n", marker)
                length = int(head[marker + 15:stop if stop >= 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            line = head[:head.find(b" http/1.1")]
            if line == b"get /link":
                self.upgrade()
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.answer(line)

    def upgrade(self) -> None:
        transport = self.transport
        if transport is None:
            return
        end = self.buffer.find(b"\r\n\r\n") + 4
        link = CannedLink(self.counters, self.ttft_s, transport)
        if not link.accept(self.buffer[:end]):
            transport.close()
            return
        transport.set_protocol(link)
        rest, self.buffer = self.buffer[end:], b""
        if rest:
            link.data_received(rest)

    def answer(self, line: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.counters.requests += 1
        if line == b"post /flows/fast/stream":
            transport.write(FAST_ANSWER)
        elif line == b"post /flows/hold/stream":
            self.holding = True
            self.counters.held += 1
            transport.write(HOLD_ANSWER)
        elif line == b"post /flows/ttft/stream":
            transport.write(HEAD)
            later(self.ttft_s, self.write, chunk(FIRST_TOKEN))
            # The rest later, so a relay that held the first token back would show in TTFT.
            later(self.ttft_s + REST_DELAY_S, self.write, chunk(REST) + LAST_CHUNK)
        elif line == b"get /stats":
            body = orjson.dumps({"held": self.counters.held, "requests": self.counters.requests})
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(body), body))
        else:
            transport.write(NOT_FOUND)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


class CannedLink(asyncio.Protocol):
    """One client connection upgraded to the runtime link: answers each OPEN as `CannedRuntime`
    answers the same request over HTTP, each answer's frames in one write. A stream is tracked
    only while it may still send (`hold`, `ttft`); `GET /stats` is served over HTTP only.

    Its WebSocket framing is its own, as the gateway's is (gateway/link_conn.py), so that the
    bench compares the gateway's two transports rather than this stand-in's: through
    `websockets`' sans-I/O protocol a run cost it 62 µs of CPU against 36 over HTTP/1.1 (at
    2,000 runs/s), framed here 45. The client's frames must be masked; fragmented messages,
    which the gateway never sends, are refused."""

    def __init__(self, counters: Counters, ttft_s: float, transport: asyncio.Transport) -> None:
        self.counters = counters
        self.ttft_s = ttft_s
        self.transport: asyncio.Transport | None = transport
        self.buffer = b""
        self.closing = False  # a close was sent: nothing more is answered
        self.streams: dict[bytes, bool] = {}  # open stream id -> counted in `held`

    def accept(self, head: bytes) -> bool:
        """Answer the upgrade request whose head is `head`; False if it was refused. The token
        is not checked, as over HTTP."""
        headers = {name.strip().lower(): value.strip() for name, _, value in (
            line.partition(b":") for line in head.split(b"\r\n")[1:])}
        key = headers.get(b"sec-websocket-key", b"")
        offered = {p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",")}
        if not key or LINK_SUBPROTOCOL.encode() not in offered:
            why = (b"no Sec-WebSocket-Key" if not key else
                   b"Sec-WebSocket-Protocol does not offer " + LINK_SUBPROTOCOL.encode())
            self.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(why), why))
            return False
        self.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                   b"connection: Upgrade\r\nsec-websocket-accept: %s\r\n"
                   b"sec-websocket-protocol: %s\r\n\r\n"
                   % (accept_key(key.decode("latin-1")).encode(), LINK_SUBPROTOCOL.encode()))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.counters.held -= sum(self.streams.values())
        self.streams.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        data = self.buffer + data if self.buffer else data
        at, size = 0, len(data)
        out: list[bytes] = []
        while size - at >= 6 and not self.closing:
            first, second = data[at], data[at + 1]
            length, start = second & 0x7F, at + 2
            if length == 126:
                length, start = int.from_bytes(data[at + 2:at + 4]), at + 4
            elif length == 127:
                length, start = int.from_bytes(data[at + 2:at + 10]), at + 10
            if length > MAX_MESSAGE_BYTES:
                self.fail(out, f"a frame of {length} bytes")
                break
            end = start + 4 + length
            if end > size:
                break
            payload = apply_mask(data[start + 4:end], data[start:start + 4])
            opcode = first & 0x0F
            at = end
            if not second & 0x80 or not first & 0x80 or first & 0x70:
                self.fail(out, "an unmasked, fragmented or extended frame")
            elif opcode == BINARY:
                self.receive(out, payload)
            elif opcode == PING:
                out.append(frame(PONG, payload))
            elif opcode == CLOSE:
                out.append(frame(CLOSE, payload[:2]))  # echoed, as the RFC asks
                self.closing = True
            elif opcode != PONG:
                self.fail(out, "a text message" if opcode == TEXT else f"opcode {opcode}")
        self.buffer = data[at:] if at < size and not self.closing else b""
        if out:
            self.write(b"".join(out))
        if self.closing and self.transport is not None:
            self.transport.close()

    def receive(self, out: list[bytes], message: bytes) -> None:
        stream, kind = message[:4], message[4:5]
        if kind == OPEN and stream != NO_STREAM and stream not in self.streams:
            self.counters.requests += 1
            head = orjson.loads(message[7:7 + int.from_bytes(message[5:7], "big")])
            path = head["path"] if head["method"] == "POST" else ""
            if path == "/flows/fast/stream":
                out += (frame(BINARY, stream + LINK_HEAD_OK), frame(BINARY, stream + LINK_FAST),
                        frame(BINARY, stream + LINK_END))
            elif path == "/flows/hold/stream":
                self.streams[stream] = True
                self.counters.held += 1
                out += (frame(BINARY, stream + LINK_HEAD_OK),
                        frame(BINARY, stream + LINK_FIRST_TOKEN))
            elif path == "/flows/ttft/stream":
                self.streams[stream] = False
                out.append(frame(BINARY, stream + LINK_HEAD_OK))
                later(self.ttft_s, self.send_later, stream, LINK_FIRST_TOKEN, False)
                later(self.ttft_s + REST_DELAY_S, self.send_later, stream, LINK_REST, True)
            else:
                out += (frame(BINARY, stream + LINK_HEAD_NOT_FOUND),
                        frame(BINARY, stream + LINK_END))
        elif kind == CANCEL:
            if self.streams.pop(stream, False):
                self.counters.held -= 1
        elif kind == OPEN:
            self.fail(out, f"an OPEN for stream {int.from_bytes(stream, 'big')}, open or 0")
        else:
            self.fail(out, f"a message of unknown kind {kind!r} or shorter than 5 bytes")

    def fail(self, out: list[bytes], why: str) -> None:
        """Close the link with 1002 (protocol error), naming what broke it."""
        if not self.closing:
            out.append(frame(CLOSE, (1002).to_bytes(2, "big") + why.encode()[:123]))
            self.closing = True

    def send_later(self, stream: bytes, data: bytes, last: bool) -> None:
        if stream not in self.streams or self.closing:
            return  # cancelled, or the link is closing or closed
        sent = frame(BINARY, stream + data)
        if last:
            del self.streams[stream]
            sent += frame(BINARY, stream + LINK_END)
        self.write(sent)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


BINARY, TEXT, CLOSE, PING, PONG = 0x2, 0x1, 0x8, 0x9, 0xA
MAX_MESSAGE_BYTES = 1 << 20


def frame(opcode: int, payload: bytes) -> bytes:
    """A WebSocket frame from the server: final, unmasked."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


def later(delay_s: float, callback: Callable[..., object], *args: object) -> None:
    """Call `callback(*args)` on the running loop after `delay_s`, to within a few tens of
    microseconds. The event loop's timers count whole milliseconds from the start of its current
    iteration, so with them the first token would come anywhere from 19 to 21 ms after a
    request: as much noise as the time-to-first-token overhead being measured."""
    loop = asyncio.get_running_loop()
    timer = threading.Timer(delay_s, loop.call_soon_threadsafe, (callback, *args))
    timer.daemon = True
    timer.start()


class Pipe(asyncio.Protocol):
    """One side of a relayed connection: what arrives is written to the other side. The client
    side opens its upstream side when it is accepted."""

    def __init__(self, upstream_port: int, other: Pipe | None = None) -> None:
        self.upstream_port = upstream_port
        self.other = other
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what the client sent before the upstream side connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = ours = cast(asyncio.Transport, transport)
        client = self.other
        if client is None:
            asyncio.get_running_loop().create_task(self.connect())
        elif client.transport is None:  # the client left while this side was connecting
            ours.close()
        else:
            client.other = self
            ours.write(b"".join(client.early))

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Pipe(self.upstream_port, self), "127.0.0.1",
                                         self.upstream_port)
        except OSError:
            self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for side in (self, self.other):
            if side is not None and side.transport is not None:
                side.transport.close()
                side.transport = None


async def serve(port: int, ttft_s: float, relay_to: int | None) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters()
    def accept() -> asyncio.Protocol:
        return CannedRuntime(counters, ttft_s) if relay_to is None else Pipe(relay_to)

    server = await loop.create_server(accept, "127.0.0.1", port, backlog=16384)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def raise_open_files(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to `wanted` (root may raise the hard limit too); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--core", type=int, default=None)
    parser.add_argument("--relay-to", type=int, default=None)
    args = parser.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    raise_open_files(OPEN_FILES)
    uvloop.run(serve(args.port, args.ttft_ms / 1000, args.relay_to))


if __name__ == "__main__":
    main()
