"""The gateway's configuration: one frozen object, read from the environment at start and
validated there, so a bad value stops the process with a message naming it."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cmp.redis_clients import check_redis_url

# The bundle `make` builds in this checkout; a deployment points GATEWAY_WIDGET_BUNDLE elsewhere.
DEFAULT_WIDGET_BUNDLE = Path(__file__).resolve().parent.parent / "widget" / "dist" / "widget.js"


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it."""


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float = 0,
    maximum: float = float("inf"),
) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "") or choices[0]
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _report_path(env: Mapping[str, str], name: str) -> Path | None:
    """A file prefix the worker writes to when it stops: its folder must exist from the start."""
    raw = env.get(name)
    if not raw:
        return None
    path = Path(raw)
    if not path.parent.is_dir():
        raise ConfigError(f"{name}: the folder {str(path.parent)!r} does not exist, got {raw!r}")
    return path


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    redis_url: str
    kafka_bootstrap: str
    jwks_url: str
    issuer: str
    runtime_token: str
    cmp_url: str
    cmp_token: str
    spool_dir: Path
    instance: str
    usage_topic: str = "agent-usage"
    audit_log: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2
    key_cache_size: int = 100_000
    jwks_refetch_interval_s: float = 5.0
    connect_timeout_s: float = 2.0
    redis_timeout_s: float = 1.0
    run_timeout_s: float = 120.0
    drain_timeout_s: float = 10.0
    max_body_bytes: int = 32 * 1024
    max_message_chars: int = 8_000
    widget_bundle: Path = DEFAULT_WIDGET_BUNDLE
    http: str = "gateway"  # gateway: chats skip ASGI (gateway.http); asgi: uvicorn's own protocol
    runtime_transport: str = "link"  # link: runs multiplexed (gateway.link); http: one per socket
    run_ahead: bool = True  # runs may start before the limiter's decision (gateway.admission)
    loop_probe: Path | None = None  # a diagnostic (gateway.loop_probe): each worker's report
    busy_poll_s: float = 0.0  # gateway.busy_poll: how long a worker polls after a chat; 0: off
    redis_cluster: bool = False  # the Redis URL names a node of a Redis Cluster (several shards)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> GatewayConfig:
        required = ("GATEWAY_JWKS_URL", "GATEWAY_RUNTIME_TOKEN", "GATEWAY_CMP_TOKEN")
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise ConfigError(f"missing setting(s): {', '.join(missing)}")
        jwks_url = env["GATEWAY_JWKS_URL"]
        redis_url = env.get("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/0")
        redis_cluster = _choice(env, "GATEWAY_REDIS_CLUSTER", ("off", "on")) == "on"
        try:
            check_redis_url(redis_url, cluster=redis_cluster)
        except ValueError as exc:
            raise ConfigError(f"GATEWAY_REDIS_URL: {exc}") from None
        audit = env.get("GATEWAY_AUDIT_LOG", "")
        return cls(
            redis_url=redis_url,
            kafka_bootstrap=env.get("GATEWAY_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            jwks_url=jwks_url,
            issuer=env.get("GATEWAY_ISSUER", "sitekit-cmp"),
            runtime_token=env["GATEWAY_RUNTIME_TOKEN"],
            cmp_url=env.get("GATEWAY_CMP_URL", jwks_url.split("/.well-known/")[0]),
            cmp_token=env["GATEWAY_CMP_TOKEN"],
            spool_dir=Path(env.get("GATEWAY_SPOOL_DIR", ".stack/gateway/spool")),
            instance=env.get("GATEWAY_INSTANCE", socket.gethostname()),
            usage_topic=env.get("GATEWAY_USAGE_TOPIC", "agent-usage"),
            audit_log=Path(audit) if audit else None,
            loop_probe=_report_path(env, "GATEWAY_LOOP_PROBE"),
            host=env.get("GATEWAY_HOST", "127.0.0.1"),
            port=int(_number(env, "GATEWAY_PORT", 8080, minimum=1, maximum=65535)),
            workers=int(_number(env, "GATEWAY_WORKERS", 2, minimum=1)),
            key_cache_size=int(_number(env, "GATEWAY_KEY_CACHE_SIZE", 100_000, minimum=1)),
            run_timeout_s=_number(env, "GATEWAY_RUN_TIMEOUT_S", 120.0, minimum=1),
            drain_timeout_s=_number(env, "GATEWAY_DRAIN_TIMEOUT_S", 10.0),
            max_body_bytes=int(_number(env, "GATEWAY_MAX_BODY_BYTES", 32 * 1024, minimum=64)),
            widget_bundle=Path(env.get("GATEWAY_WIDGET_BUNDLE") or DEFAULT_WIDGET_BUNDLE),
            http=_choice(env, "GATEWAY_HTTP", ("gateway", "asgi")),
            runtime_transport=_choice(env, "GATEWAY_RUNTIME_TRANSPORT", ("link", "http")),
            run_ahead=_choice(env, "GATEWAY_RUN_AHEAD", ("on", "off")) == "on",
            busy_poll_s=_number(env, "GATEWAY_BUSY_POLL_US", 0, maximum=100_000) / 1e6,
            redis_cluster=redis_cluster,
        )
