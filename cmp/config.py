"""The CMP's configuration: one frozen object, read from the environment at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True, slots=True)
class CmpConfig:
    database_url: str
    redis_url: str
    issuer: str
    service_token: str
    host: str = "127.0.0.1"
    port: int = 8081

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> CmpConfig:
        missing = [
            name for name in ("CMP_DATABASE_URL", "CMP_SERVICE_TOKEN") if not env.get(name)
        ]
        if missing:
            raise ConfigError(f"missing setting(s): {', '.join(missing)}")
        port = _int(env, "CMP_PORT", 8081)
        return cls(
            database_url=env["CMP_DATABASE_URL"],
            redis_url=env.get("CMP_REDIS_URL", "redis://127.0.0.1:6379/0"),
            issuer=env.get("CMP_ISSUER", "sitekit-cmp"),
            service_token=env["CMP_SERVICE_TOKEN"],
            host=env.get("CMP_HOST", "127.0.0.1"),
            port=port,
        )
