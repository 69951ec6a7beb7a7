"""The CMP's configuration: one frozen object, read from the environment at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from cmp.redis_clients import check_redis_url


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, low: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")
    return value


def _switch(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "") or "off"
    if raw not in ("on", "off"):
        raise ConfigError(f"{name} must be on or off, got {raw!r}")
    return raw == "on"


@dataclass(frozen=True, slots=True)
class CmpConfig:
    database_url: str
    redis_url: str
    issuer: str
    service_token: str
    host: str = "127.0.0.1"
    port: int = 8081
    # The runtime that provisioning deploys flows to, and the URL gateways reach it by.
    runtime_url: str = "http://127.0.0.1:8090"
    runtime_token: str = ""
    # The marketplace's order-approved webhook signs its body with this secret (HMAC-SHA256).
    webhook_secret: str = ""
    # OpenAI-compatible embeddings for training documents (the mock LLM in dev).
    embeddings_url: str = "http://127.0.0.1:8091/v1"
    embeddings_api_key: str = "sk-mock"
    embeddings_model: str = "text-embedding-mock"
    max_body_bytes: int = 2 * 1024 * 1024
    # Provisioning: attempts before a config is marked failed, and the first retry delay.
    provision_attempts: int = 8
    provision_backoff_s: float = 0.5
    provision_max_backoff_s: float = 60.0
    redis_cluster: bool = False  # CMP_REDIS_CLUSTER: the URL names a node of a Redis Cluster

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> CmpConfig:
        missing = [
            name for name in ("CMP_DATABASE_URL", "CMP_SERVICE_TOKEN") if not env.get(name)
        ]
        if missing:
            raise ConfigError(f"missing setting(s): {', '.join(missing)}")
        raw_backoff = env.get("CMP_PROVISION_BACKOFF_S") or "0.5"
        try:
            backoff = float(raw_backoff)
        except ValueError:
            backoff = 0.0
        if not 0 < backoff <= 60:
            raise ConfigError("CMP_PROVISION_BACKOFF_S must be a number of seconds above 0 and"
                              f" at most 60, got {raw_backoff!r}")
        redis_url = env.get("CMP_REDIS_URL", "redis://127.0.0.1:6379/0")
        redis_cluster = _switch(env, "CMP_REDIS_CLUSTER")
        try:
            check_redis_url(redis_url, cluster=redis_cluster)
        except ValueError as exc:
            raise ConfigError(f"CMP_REDIS_URL: {exc}") from None
        return cls(
            database_url=env["CMP_DATABASE_URL"],
            redis_url=redis_url,
            redis_cluster=redis_cluster,
            issuer=env.get("CMP_ISSUER", "sitekit-cmp"),
            service_token=env["CMP_SERVICE_TOKEN"],
            host=env.get("CMP_HOST", "127.0.0.1"),
            port=_int(env, "CMP_PORT", 8081, 1),
            runtime_url=env.get("CMP_RUNTIME_URL", "http://127.0.0.1:8090").rstrip("/"),
            runtime_token=env.get("CMP_RUNTIME_TOKEN", ""),
            webhook_secret=env.get("CMP_WEBHOOK_SECRET", ""),
            embeddings_url=env.get("CMP_EMBEDDINGS_URL", "http://127.0.0.1:8091/v1").rstrip("/"),
            embeddings_api_key=env.get("CMP_EMBEDDINGS_API_KEY", "sk-mock"),
            embeddings_model=env.get("CMP_EMBEDDINGS_MODEL", "text-embedding-mock"),
            max_body_bytes=_int(env, "CMP_MAX_BODY_BYTES", 2 * 1024 * 1024, 1024),
            provision_attempts=_int(env, "CMP_PROVISION_ATTEMPTS", 8, 1),
            provision_backoff_s=backoff,
        )
