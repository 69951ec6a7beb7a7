"""The forecast that lets a chat's run start before the limiter's decision, and the verdict the
relay waits on (gateway.admission); end to end in tests/e2e/test_run_ahead.py."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Forecast, Judgement, Refused, Verdict
from gateway.errors import RateLimited
from ratelimit.buckets import Decision

T, K = "tenant-1", "key-1"
LIMITS = [(b"ratelimit-remaining", b"4")]


def test_a_key_starts_ahead_only_on_tokens_its_last_decision_left() -> None:
    forecast = Forecast()
    assert not forecast.reserve(T, K)  # no decision yet
    forecast.learn(T, K, 2, reserved=False)
    assert forecast.reserve(T, K)
    assert forecast.reserve(T, K)
    assert not forecast.reserve(T, K)  # both held by chats started ahead
    forecast.learn(T, K, 5, reserved=True)  # one of them decided: 5 left, one still held
    assert [forecast.reserve(T, K) for _ in range(5)] == [True] * 4 + [False]
    assert not forecast.reserve(T, "key-2")  # keys are apart


def test_a_refusal_or_a_failure_stops_starting_ahead() -> None:
    forecast = Forecast()
    forecast.learn(T, K, 3, reserved=False)
    assert forecast.reserve(T, K)
    forecast.learn(T, K, 0, reserved=True)
    assert not forecast.reserve(T, K)


def test_the_forecast_holds_at_most_max_keys() -> None:
    forecast = Forecast(max_keys=2)
    forecast.learn(T, "a", 5, reserved=False)
    forecast.learn(T, "b", 5, reserved=False)
    forecast.learn(T, "c", 5, reserved=False)  # starts over
    assert not forecast.reserve(T, "a")
    assert forecast.reserve(T, "c")


def judged(pending: asyncio.Future[Decision]) -> Judgement:
    decision = pending.result()
    return LIMITS, None if decision.allowed else RateLimited("too many")


ALLOWED = Decision(True, None, 5, 4, 1, None)
REFUSED = Decision(False, "key", 5, 0, 1, 3)


async def test_the_relay_gets_the_headers_of_an_admitted_chat() -> None:
    pending: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
    verdict = Verdict(pending, judged)
    billed: list[str] = []
    verdict.when_admitted(lambda: billed.append("event"))
    asyncio.get_running_loop().call_later(0.01, pending.set_result, ALLOWED)
    assert await verdict.admit() == LIMITS
    assert billed == ["event"]


async def test_a_refusal_before_the_relay_asks_cancels_its_task() -> None:
    pending: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
    billed: list[str] = []

    async def relay() -> str:
        verdict = Verdict(pending, judged)
        verdict.when_admitted(lambda: billed.append("event"))
        try:
            await asyncio.sleep(5)  # waiting on the runtime
        except asyncio.CancelledError:
            assert verdict.cut_off
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            with pytest.raises(Refused) as refused:
                await verdict.admit()
            return refused.value.error.code
        return "not cut off"

    task = asyncio.create_task(relay())
    await asyncio.sleep(0)
    pending.set_result(REFUSED)
    assert await asyncio.wait_for(task, 1) == "rate_limited"
    assert billed == []


async def test_a_refusal_after_the_relay_is_done_cancels_nothing() -> None:
    pending: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()

    async def relay() -> Verdict:
        verdict = Verdict(pending, judged)
        verdict.close()
        return verdict

    verdict = await asyncio.create_task(relay())
    pending.set_result(REFUSED)
    await asyncio.sleep(0)
    assert not verdict.cut_off


async def test_a_client_that_leaves_while_the_relay_waits_does_not_cancel_the_decision() -> None:
    pending: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
    verdict = Verdict(pending, judged)
    waiting = asyncio.create_task(verdict.admit())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    assert not pending.cancelled()
    billed: list[str] = []
    verdict.when_admitted(lambda: billed.append("event"))
    pending.set_result(ALLOWED)
    await asyncio.sleep(0)
    assert billed == ["event"]
