"""Starting a chat's run while the rate limiter decides it.

The limiter's decision costs a Redis round trip: at a low rate, about a third of what the gateway
adds to a chat. When the last decision for a key left tokens in both of its buckets, the gateway
starts the chat's run at the runtime at once and lets the decision arrive meanwhile; nothing
reaches the client before it has. If the limiter refuses the chat after all (the key's tokens
were spent through other workers in between) or fails, the run is cancelled, the client gets
the 429 or 503 it would have got anyway, and no usage event is emitted.

What a refused run can cost the runtime is bounded: `Forecast` lets a worker start ahead only
as many chats of a key as its last decision left tokens for, and a key it has seen refused, or
has no decision for yet, waits for the limiter as before. A busy worker (more than a few checks
waiting on Redis: `gateway.chat.RUN_AHEAD_MAX_UNDECIDED`) waits too, since its round trips are
shared by batches and its runs, started as their decisions come in, reach the runtime together.
`GATEWAY_RUN_AHEAD=off` turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.errors import GatewayError, Unavailable
from gateway.responses import Headers
from ratelimit.buckets import Decision

# What the limiter's answer means for a chat: the RateLimit headers of its response, and the
# error to answer instead if it was not admitted.
Judgement = tuple[Headers, GatewayError | None]


class Forecast:
    """Per key, the tokens its last decision left (0 if refused or failed), less the chats this
    worker started ahead on them since. Holds at most `max_keys` keys; past that it starts over,
    so a key not seen since waits for one decision again."""

    __slots__ = ("_known", "_max_keys")

    def __init__(self, max_keys: int = 100_000) -> None:
        self._known: dict[tuple[str, str], list[int]] = {}  # key -> [tokens left, started ahead]
        self._max_keys = max_keys

    def reserve(self, tenant_id: str, key_id: str) -> bool:
        """Whether a chat of this key may start ahead; if so, it holds one of the tokens left
        until `learn` is called for it."""
        known = self._known.get((tenant_id, key_id))
        if known is None or known[0] - known[1] < 1:
            return False
        known[1] += 1
        return True

    def learn(self, tenant_id: str, key_id: str, left: int, *, reserved: bool) -> None:
        """Record a decision: `left` tokens remain (0 when refused or when the limiter failed);
        `reserved` if the chat it decided had started ahead."""
        key = (tenant_id, key_id)
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= self._max_keys:
                self._known.clear()
            known = self._known[key] = [0, 0]
        elif reserved:
            known[1] = max(known[1] - 1, 0)
        known[0] = left


class Verdict:
    """The limiter's pending decision for a chat whose run has started.

    The relay calls `admit()` before anything reaches the client, and `close()` when it is done
    with the chat. A refusal that comes while the relay is still waiting on the runtime cancels
    the relay's task (`cut_off` says why), which then answers the refusal instead."""

    __slots__ = ("_judge", "_task", "_judged", "_passed", "_then", "_waiter", "cut_off")

    def __init__(
        self, pending: asyncio.Future[Decision],
        judge: Callable[[asyncio.Future[Decision]], Judgement],
    ) -> None:
        self._judge = judge
        self._task = asyncio.current_task()
        self._judged: Judgement | None = None
        self._passed = False  # the relay asked for the decision, or is done: cancel it no more
        self._then: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.cut_off = False
        pending.add_done_callback(self._decided)

    async def admit(self) -> Headers:
        """The RateLimit headers once the chat is admitted; `Refused` if it is not."""
        self._passed = True
        if self._judged is None:
            # A future of its own: a client leaving now cancels this wait, not the decision,
            # which still settles the chat's usage event (`when_admitted`).
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        assert self._judged is not None
        headers, error = self._judged
        if error is not None:
            raise Refused(error, headers)
        return headers

    def close(self) -> None:
        """The relay is done with the chat: a refusal from now on cancels nothing."""
        self._passed = True

    def when_admitted(self, then: Callable[[], None]) -> None:
        """Call `then` if and once the chat is admitted (at once if it already is)."""
        if self._judged is None:
            self._then = then
        elif self._judged[1] is None:
            then()

    def _decided(self, future: asyncio.Future[Decision]) -> None:
        if future.cancelled():  # the limiter was closed under it
            self._judged = ([], Unavailable("the rate limiter is unavailable"))
        else:
            self._judged = self._judge(future)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._judged[1] is None:
            then, self._then = self._then, None
            if then is not None:
                then()
        else:
            self._then = None
            task = self._task
            if not self._passed and task is not None and not task.done():
                self.cut_off = True
                task.cancel()


class Refused(Exception):
    """The limiter did not admit a chat whose run had started: answer `error`, with `headers`."""

    def __init__(self, error: GatewayError, headers: Headers) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = headers
