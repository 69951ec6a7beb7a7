"""A warning repeated by every request is written once per interval."""

from __future__ import annotations

import pytest

from gateway import log_throttle
from gateway.log_throttle import LogThrottle


def test_the_first_warning_goes_out_and_the_repeats_wait_for_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(log_throttle.time, "monotonic", lambda: now[0])
    throttle = LogThrottle(10.0)
    assert throttle.due()
    now[0] += 9.9
    assert not throttle.due()
    now[0] += 0.1
    assert throttle.due()
    assert not throttle.due()
