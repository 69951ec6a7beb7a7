"""Runs numbered on shared connections to the runtime: the gateway's side of the runtime link
(`sitekit-link.1`; the frames are described in runtime/link.py).

Over HTTP/1.1 every open chat holds a second socket, to the runtime, so a worker's open chats
are capped at half its open-files limit. Over the link a worker holds at most `max_links`
connections per runtime origin and numbers its runs on them. The pool answers like
`UpstreamPool`, with the same errors, so the relay does not know which one it calls:

    pool = LinkPool(authorization=b"Bearer <runtime token>")
    response = await pool.request("POST", ("runtime", 8000, "/flows/f/stream"), headers, body)
    try:
        async for chunk in response.iter_raw():
            ...
    finally:
        await response.aclose()  # before the body's end this cancels the run
    await pool.aclose()

A run goes on the link of its origin that most recently had room for one more (fewer than
`streams_per_link` runs); when none has, a new one is opened, up to `max_links`, after which runs
go round the links in turn. A link that goes unused for `idle_expiry_s` is closed, down to one
per origin.

By default a link carries one run until the origin has `max_links` links: below that, runs are
spread as HTTP/1.1 connections spread them. A runtime's workers each accept connections of their
own, and every run of a link is served by the worker that accepted it. Measured with `make up`
(two gateway workers) and a runtime of two workers, 16 concurrent chats: with 16 runs to a link
one runtime worker served them all (4.4 s of CPU against 0.02) and the median time to first
token was 268-291 ms; with one run to a link the workers shared them (2.7 and 2.6 s) and it was
189-195 ms, as over HTTP/1.1 (203-227). Links pay off where descriptors run out: 10,000 open
chats go over 256 links.

A runtime that answers the upgrade as one that does not serve the link would (404, 405, 400,
426 or 501: an older runtime, or a proxy that does not upgrade) gets its runs over HTTP/1.1,
through the `fallback` pool, for `without_link_s`; then the link is tried again.

A link is a WebSocket (`gateway.link_conn`). HTTP/2 would multiplex as well, but through `h2`
it costs about 109 µs of CPU per request, most of a worker's budget.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field, fields

from gateway.link_conn import LinkConnection, LinkRefused, LinkStream
from gateway.upstream import (
    RuntimeAnswer,
    RuntimeCaller,
    StreamedBody,
    UpstreamClosed,
    UpstreamTimeout,
    connect,
)
from gateway.upstream_conn import Headers, Origin, Route, Target, parse_target

log = logging.getLogger("sitekit.gateway")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    """How the pool connects, waits, spreads runs and buffers. Every wait is bounded."""

    connect_timeout_s: float = 2.0
    first_byte_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    streams_per_link: int = 1
    max_links: int = 256
    idle_expiry_s: float = 30.0
    buffer_limit_bytes: int = 1024 * 1024
    max_message_bytes: int = 16 * 1024 * 1024
    without_link_s: float = 60.0  # runs to a runtime that does not serve the link go elsewhere

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value <= 0:
                raise ValueError(f"LinkSettings.{spec.name} must be positive, got {value!r}")


@dataclass(slots=True)
class _Opening:
    """A link being opened, and how many runs wait to go on it."""

    link: asyncio.Future[LinkConnection]
    claims: int = 0


@dataclass(slots=True)
class _Links:
    """One origin's links: all of them, those being opened, and a stack of those with room for
    a run (most recently freed on top; an entry is checked when taken, so a stale one costs a
    pop), so that finding a link takes the same time however many there are."""

    all: list[LinkConnection] = field(default_factory=list)
    opening: list[_Opening] = field(default_factory=list)
    with_room: list[LinkConnection] = field(default_factory=list)
    turn: int = 0  # past `max_links`, runs go round the links in turn


class LinkPool:
    """Runtime links per origin; runs spread over them (see the module's docstring)."""

    def __init__(
        self, settings: LinkSettings | None = None, *, authorization: bytes,
        ssl_context: ssl.SSLContext | None = None, fallback: RuntimeCaller | None = None,
    ) -> None:
        self.settings = settings or LinkSettings()
        self._authorization = authorization
        self._ssl_context = ssl_context
        self._fallback = fallback
        self._without_link: dict[Origin, float] = {}  # origin -> when to try the link again
        self._links: dict[Origin, _Links] = {}
        self._routes: dict[Target, Route] = {}
        self._reaped_at = 0.0
        self._closed = False

    async def request(
        self, method: str, target: Target, headers: Headers = (), body: bytes = b""
    ) -> RuntimeAnswer:
        """Start one run; return once its status and headers are in."""
        if self._closed:
            raise RuntimeError("the link pool is closed")
        route = self._routes.get(target)
        if route is None:
            route = self._remember(target)
        origin = route.origin
        if self._without_link and self._fallback is not None \
                and self._without_link.get(origin, 0.0) > time.monotonic():
            return await self._fallback.request(method, target, headers, body)
        for attempt in (1, 2):
            try:
                link, fresh = await self._link_for(route)
            except LinkRefused as exc:
                if self._fallback is None or not exc.not_served:
                    raise
                self._fall_back(origin, exc)
                return await self._fallback.request(method, target, headers, body)
            stream = link.open(method, route.path.decode("ascii"), headers, body)
            response = await self._head(link, stream)
            if response is not None:
                return response
            if fresh or attempt == 2:
                raise UpstreamClosed(f"{origin} closed the runtime link without answering") \
                    from link.lost_exc
            # The link ended before this run's head: the runtime went away as we sent, which
            # cancelled the run there. Once more on a fresh link; never after a byte.
        raise AssertionError("unreachable")

    def _fall_back(self, origin: Origin, refusal: LinkRefused) -> None:
        """`origin` does not serve the link (an older runtime, say): its runs go over HTTP/1.1
        for `without_link_s`, then the link is tried again."""
        if self._without_link.get(origin, 0.0) <= time.monotonic():
            log.warning("%s; its runs go over HTTP/1.1 for %g s, then the link is tried "
                        "again", refusal, self.settings.without_link_s)
        self._without_link[origin] = time.monotonic() + self.settings.without_link_s

    async def aclose(self) -> None:
        """Close every link; runs still open on them end as closed mid-answer."""
        self._closed = True
        for links in self._links.values():
            for link in links.all:
                link.close()
        self._links.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    @property
    def links(self) -> int:
        return sum(len(links.all) for links in self._links.values())

    async def _head(self, link: LinkConnection, stream: LinkStream) -> LinkResponse | None:
        deadline = link.loop.time() + self.settings.first_byte_timeout_s
        try:
            while not stream.headers_done:
                if stream.error is not None:
                    raise stream.error
                if link.lost:
                    return None
                if not await stream.wait(deadline):
                    raise UpstreamTimeout(f"{link.origin} sent no response head within "
                                          f"{self.settings.first_byte_timeout_s} s")
        except BaseException:
            link.cancel(stream)
            raise
        return LinkResponse(self, stream)

    async def _link_for(self, route: Route) -> tuple[LinkConnection, bool]:
        """A link with room for one more run, and whether it was opened for this one."""
        origin = route.origin
        links = self._links.get(origin)
        if links is None:
            links = self._links[origin] = _Links()
        now = time.monotonic()
        if now - self._reaped_at > 1.0:
            self._reaped_at = now
            self._reap(links, now)
        limit = self.settings.streams_per_link
        with_room = links.with_room
        while with_room:
            link = with_room[-1]
            if link.usable and len(link.streams) < limit:
                if len(link.streams) + 1 >= limit:
                    with_room.pop()  # full with this run; back when one of its runs ends
                    link.listed = False
                return link, False
            with_room.pop()
            link.listed = False
        openings = links.opening
        if len(links.all) + len(openings) >= self.settings.max_links:
            for _ in range(len(links.all)):
                links.turn = (links.turn + 1) % len(links.all)
                link = links.all[links.turn]
                if link.usable:
                    return link, False
        # Runs that arrive while links are being opened share them, as many to one as a link
        # takes, rather than each opening its own.
        opening = min(openings, key=lambda o: o.claims, default=None)
        if opening is None or (opening.claims >= limit
                               and len(links.all) + len(openings) < self.settings.max_links):
            opening = _Opening(asyncio.ensure_future(self._connect(route, links)))
            openings.append(opening)
            opening.link.add_done_callback(lambda _: self._opened(links, opening))
        opening.claims += 1
        try:
            return await asyncio.shield(opening.link), True
        except asyncio.CancelledError:  # its client went away while the link opened
            opening.claims -= 1
            if opening.link.done() and not opening.link.cancelled() \
                    and opening.link.exception() is None:
                self._offer(links, opening.link.result())  # _opened counted this claim
            raise

    def _opened(self, links: _Links, opening: _Opening) -> None:
        links.opening.remove(opening)
        if opening.link.cancelled() or opening.link.exception() is not None:
            return  # its waiters raise the exception; this only marked it retrieved
        if opening.claims < self.settings.streams_per_link:  # room left once they are on it
            self._offer(links, opening.link.result())

    def _offer(self, links: _Links, link: LinkConnection) -> None:
        """List `link` among those with room, if it has room and is not listed."""
        if not link.listed and len(link.streams) < self.settings.streams_per_link \
                and link.usable:
            links.with_room.append(link)
            link.listed = True

    async def _connect(self, route: Route, links: _Links) -> LinkConnection:
        loop = asyncio.get_running_loop()
        settings, origin = self.settings, route.origin

        def settled(link: LinkConnection) -> None:
            self._offer(links, link)

        link = LinkConnection(loop, origin, route.authority, self._authorization,
                              buffer_limit=settings.buffer_limit_bytes,
                              max_message_bytes=settings.max_message_bytes, settled=settled)
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                await connect(loop, link, origin, self._ssl_context)
                await link.ready
        except TimeoutError as exc:
            link.close()
            raise UpstreamTimeout(f"opening the runtime link to {origin} took longer than "
                                  f"{settings.connect_timeout_s} s") from exc
        if self._closed:
            link.close()
            raise RuntimeError("the link pool is closed")
        links.all.append(link)  # lost ones go at the next _reap
        return link

    def _reap(self, links: _Links, now: float) -> None:
        """Forget lost links; close links idle for `idle_expiry_s`, keeping one."""
        keep: list[LinkConnection] = []
        idle_before = now - self.settings.idle_expiry_s
        for link in links.all:
            if link.lost:
                continue
            if keep and not link.streams and link.idle_since < idle_before:
                link.close()
                continue
            keep.append(link)
        links.all[:] = keep
        for link in links.with_room:
            link.listed = link.usable
        links.with_room[:] = [link for link in links.with_room if link.listed]

    def _remember(self, target: Target) -> Route:
        route = parse_target(target)
        if len(self._routes) >= 4096:
            self._routes.clear()
        self._routes[target] = route
        return route


class LinkResponse(StreamedBody):
    """Status and headers of a run whose body is still arriving; read it like an
    `UpstreamResponse`. Closing it before the end cancels the run."""

    __slots__ = ("status", "headers", "_pool", "_stream", "_ended")

    def __init__(self, pool: LinkPool, stream: LinkStream) -> None:
        self.status = stream.status
        self.headers = stream.headers
        self._pool = pool
        self._stream: LinkStream | None = stream
        self._ended = False

    async def __anext__(self) -> bytes:
        stream = self._stream
        if stream is None:
            if self._ended:
                raise StopAsyncIteration
            raise UpstreamClosed("the response was closed before its body was read")
        link = stream.link
        while True:
            chunk = stream.take()
            if chunk:
                return chunk
            if stream.complete:
                self._stream = None
                self._ended = True
                raise StopAsyncIteration
            if stream.error is not None:
                self._stream = None
                raise stream.error
            if link.lost:
                self._stream = None
                raise UpstreamClosed(f"{link.origin} closed the runtime link mid-body") \
                    from link.lost_exc
            read_timeout = self._pool.settings.read_timeout_s
            if not await stream.wait(link.loop.time() + read_timeout):
                self._stream = None
                link.cancel(stream)
                raise UpstreamTimeout(f"{link.origin} sent nothing for {read_timeout} s")

    async def aclose(self) -> None:
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        if not stream.complete:
            stream.link.cancel(stream)
