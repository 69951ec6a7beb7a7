"""The paired-rounds bench's arithmetic: variants as given, the sign test, the summary."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.bench_ab import DEFAULT, Variant, parse_variant, sign_test_p, summarise


def test_a_variant_names_its_worker_and_settings() -> None:
    assert parse_variant("poll300:GATEWAY_BUSY_POLL_US=300,GATEWAY_RUNTIME_TRANSPORT=http") == \
        Variant("poll300", {"GATEWAY_BUSY_POLL_US": "300", "GATEWAY_RUNTIME_TRANSPORT": "http"})


@pytest.mark.parametrize(("text", "named"), [
    ("GATEWAY_BUSY_POLL_US=300", "expected NAME:KEY=VALUE"),
    ("poll:", "expected NAME:KEY=VALUE"),
    (f"{DEFAULT}:GATEWAY_BUSY_POLL_US=1", "not 'default'"),
    ("a b:GATEWAY_BUSY_POLL_US=1", "letters, digits"),
    ("poll:REDIS_URL=redis://elsewhere", "'REDIS_URL=redis://elsewhere' is not a GATEWAY_*"),
    ("poll:GATEWAY_BUSY_POLL_US", "'GATEWAY_BUSY_POLL_US' is not a GATEWAY_*=VALUE"),
])
def test_a_bad_variant_is_named(text: str, named: str) -> None:
    with pytest.raises(ValueError, match="variant") as caught:
        parse_variant(text)
    assert named in str(caught.value)


def test_sign_test() -> None:
    assert sign_test_p(5, 10) == 1.0
    assert sign_test_p(9, 10) == sign_test_p(1, 10) == round(2 * 11 / 1024, 4)
    assert sign_test_p(10, 10) == round(2 / 1024, 4)
    assert sign_test_p(0, 0) == 1.0


def _round(direct: tuple[float, float], workers: dict[str, tuple[float, float, float]]
           ) -> dict[str, dict[str, Any]]:
    """A round as `overhead_round` returns it; the relay and the sender's clock as the direct
    call, which the figures asserted here do not read."""

    def latency(p50: float, p99: float) -> dict[str, Any]:
        return {series: {"p50_ms": p50, "p99_ms": p99}
                for series in ("latency", "latency_from_send")}

    found: dict[str, dict[str, Any]] = {"direct": latency(*direct), "relay": latency(*direct)}
    for name, (p50, p99, share) in workers.items():
        found[name] = {**latency(p50, p99), "rps": 2000.0, "worker_cpu_share": share,
                       "worker_cpu_us_per_request": share / 2000 * 1e6}
    return found


def test_each_round_is_taken_against_its_own_direct_run() -> None:
    rounds = [
        _round((0.1, 0.5), {DEFAULT: (0.6, 3.0, 0.7), "fast": (0.4, 2.0, 0.8)}),
        _round((0.2, 1.0), {DEFAULT: (0.6, 2.5, 0.7), "fast": (0.5, 2.5, 0.8)}),
        _round((0.1, 0.4), {DEFAULT: (0.5, 1.9, 0.6), "fast": (0.3, 1.4, 0.9)}),
    ]
    found = summarise(rounds, [Variant("fast", {"GATEWAY_BUSY_POLL_US": "300"})], 2000, 5)
    default, fast = found["workers"][DEFAULT], found["workers"]["fast"]
    assert default["overhead_p99_rounds_ms"] == [2.5, 1.5, 1.5]
    assert default["overhead_p99_ms"] == 1.5
    assert default["overhead_p50_rounds_ms"] == [0.5, 0.4, 0.4]
    assert default["rounds_p99_within_target"] == 2
    assert fast["overhead_p99_rounds_ms"] == [1.5, 1.5, 1.0]
    assert fast["worker_cpu_share"] == 0.8
    # The tie (round 2) is left out of the count.
    assert found["against_default"]["fast"] == {
        "env": {"GATEWAY_BUSY_POLL_US": "300"}, "p99_lower_in": 2, "of": 2,
        "sign_test_p": 0.5}
    assert found["rounds"] == 3
