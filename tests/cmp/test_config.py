"""The CMP's settings: a bad value stops it at start with a message naming the setting."""

from __future__ import annotations

import pytest

from cmp.config import CmpConfig, ConfigError

REQUIRED = {"CMP_DATABASE_URL": "postgresql://x/y", "CMP_SERVICE_TOKEN": "token"}


def test_defaults_and_overrides() -> None:
    config = CmpConfig.from_env({**REQUIRED, "CMP_PROVISION_BACKOFF_S": "2",
                                 "CMP_RUNTIME_URL": "http://runtime:8090/"})
    assert config.provision_backoff_s == 2.0 and config.runtime_url == "http://runtime:8090"
    assert config.webhook_secret == "" and config.max_body_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(("name", "value"), [
    ("CMP_PROVISION_BACKOFF_S", "-1"), ("CMP_PROVISION_BACKOFF_S", "soon"),
    ("CMP_PROVISION_BACKOFF_S", "0"), ("CMP_PROVISION_ATTEMPTS", "0"),
    ("CMP_MAX_BODY_BYTES", "12"), ("CMP_PORT", "http"),
])
def test_bad_values_are_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        CmpConfig.from_env({**REQUIRED, name: value})


def test_missing_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="CMP_DATABASE_URL"):
        CmpConfig.from_env({"CMP_SERVICE_TOKEN": "token"})
