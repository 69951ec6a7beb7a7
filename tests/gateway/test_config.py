"""The gateway's settings: read from the environment, and a bad value named at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, GatewayConfig

REQUIRED = {
    "GATEWAY_JWKS_URL": "http://127.0.0.1:8081/.well-known/jwks.json",
    "GATEWAY_RUNTIME_TOKEN": "runtime-token",
    "GATEWAY_CMP_TOKEN": "cmp-token",
}


def test_defaults_serve_chats_with_the_gateways_own_protocol() -> None:
    config = GatewayConfig.from_env(REQUIRED)
    assert config.http == "gateway"
    assert config.runtime_transport == "link"
    assert config.workers == 2 and config.max_body_bytes == 32 * 1024
    assert config.loop_probe is None
    assert config.busy_poll_s == 0  # off: a worker sleeps whenever it has nothing to do


def test_busy_polling_is_set_in_microseconds() -> None:
    assert GatewayConfig.from_env({**REQUIRED, "GATEWAY_BUSY_POLL_US": "1000"}).busy_poll_s == 0.001


def test_redis_is_one_server_unless_said_to_be_a_cluster() -> None:
    assert not GatewayConfig.from_env(REQUIRED).redis_cluster
    assert GatewayConfig.from_env({**REQUIRED, "GATEWAY_REDIS_CLUSTER": "on"}).redis_cluster


@pytest.mark.parametrize(("url", "cluster", "expected"), [
    ("http://127.0.0.1:6379", "off", "GATEWAY_REDIS_URL: Redis URL must specify one of the "
     "following schemes (redis://, rediss://, unix://)"),
    ("redis://127.0.0.1:7000/2", "on",
     "GATEWAY_REDIS_URL: Redis Cluster has database 0 only: the URL names database 2"),
    ("unix:///run/redis.sock", "on",
     "GATEWAY_REDIS_URL: a Redis Cluster is reached over TCP: the URL names a Unix socket"),
    ("rediss://127.0.0.1?ssl_ca_certs=/missing/ca.pem", "off", "GATEWAY_REDIS_URL: ssl_ca_certs "
     "in the Redis URL cannot be read ('/missing/ca.pem'): No such file or directory"),
])
def test_a_redis_url_the_worker_cannot_use_is_named_at_start(
    url: str, cluster: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        GatewayConfig.from_env(
            {**REQUIRED, "GATEWAY_REDIS_URL": url, "GATEWAY_REDIS_CLUSTER": cluster})
    assert str(refused.value) == expected


def test_the_loop_probe_is_on_when_it_names_a_file() -> None:
    config = GatewayConfig.from_env({**REQUIRED, "GATEWAY_LOOP_PROBE": "/tmp/probe"})
    assert config.loop_probe == Path("/tmp/probe")


def test_a_loop_probe_in_a_missing_folder_is_refused_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "probe"
    with pytest.raises(ConfigError, match="GATEWAY_LOOP_PROBE: the folder .*nowhere"):
        GatewayConfig.from_env({**REQUIRED, "GATEWAY_LOOP_PROBE": str(missing)})


def test_the_stock_asgi_protocol_can_be_chosen() -> None:
    assert GatewayConfig.from_env({**REQUIRED, "GATEWAY_HTTP": "asgi"}).http == "asgi"


def test_runs_can_go_over_http_instead_of_the_link() -> None:
    config = GatewayConfig.from_env({**REQUIRED, "GATEWAY_RUNTIME_TRANSPORT": "http"})
    assert config.runtime_transport == "http"


def test_runs_start_ahead_of_the_limiter_unless_turned_off() -> None:
    assert GatewayConfig.from_env(REQUIRED).run_ahead
    assert not GatewayConfig.from_env({**REQUIRED, "GATEWAY_RUN_AHEAD": "off"}).run_ahead


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("GATEWAY_RUN_AHEAD", "yes", "GATEWAY_RUN_AHEAD must be one of on, off, got 'yes'"),
    ("GATEWAY_HTTP", "h2", "GATEWAY_HTTP must be one of gateway, asgi, got 'h2'"),
    ("GATEWAY_RUNTIME_TRANSPORT", "grpc",
     "GATEWAY_RUNTIME_TRANSPORT must be one of link, http, got 'grpc'"),
    ("GATEWAY_BUSY_POLL_US", "1e6", "GATEWAY_BUSY_POLL_US must be at most 100000, got '1e6'"),
    ("GATEWAY_BUSY_POLL_US", "-5", "GATEWAY_BUSY_POLL_US must be at least 0, got '-5'"),
    ("GATEWAY_WORKERS", "0", "GATEWAY_WORKERS must be at least 1, got '0'"),
    ("GATEWAY_REDIS_CLUSTER", "true", "GATEWAY_REDIS_CLUSTER must be one of off, on, got 'true'"),
    ("GATEWAY_PORT", "70000", "GATEWAY_PORT must be at most 65535, got '70000'"),
    ("GATEWAY_DRAIN_TIMEOUT_S", "soon", "GATEWAY_DRAIN_TIMEOUT_S must be a number, got 'soon'"),
])
def test_a_bad_value_is_named(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        GatewayConfig.from_env({**REQUIRED, name: value})
    assert str(refused.value) == expected


def test_a_missing_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_RUNTIME_TOKEN"):
        GatewayConfig.from_env({k: v for k, v in REQUIRED.items()
                                if k != "GATEWAY_RUNTIME_TOKEN"})
