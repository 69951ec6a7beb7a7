"""The whole embedded stack: Postgres (pgserver), Redis, Kafka (Tansu), the mock LLM, the
runtime, the CMP and the gateway, started in dependency order on loopback with their data and
logs under one folder. `make up` runs it on fixed ports; the tests on free ones."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from devstack import services
from devstack.procs import ManagedProcess, StackError, free_port, port_is_free

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ports:
    gateway: int = 8080
    cmp: int = 8081
    runtime: int = 8090
    mockllm: int = 8091
    redis: int = 6390
    kafka: int = 9092

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(6)))


@dataclass(frozen=True, slots=True)
class Secrets:
    runtime_token: str
    cmp_token: str
    webhook_secret: str

    @classmethod
    def load_or_create(cls, path: Path) -> Secrets:
        """Reuse the secrets of an earlier `make up`; any one missing is made and kept."""
        raw: dict[str, str] = orjson.loads(path.read_bytes()) if path.exists() else {}
        values = {name: raw.get(name) or secrets.token_urlsafe(24)
                  for name in cls.__dataclass_fields__}
        if values != raw:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(orjson.dumps(values))
            path.chmod(0o600)
        return cls(**values)


@dataclass
class StackSettings:
    root: Path
    ports: Ports = field(default_factory=Ports)
    gateway_workers: int = 2
    llm_first_token_ms: float = 150
    llm_tokens_per_s: float = 40
    usage_topic: str = "agent-usage"
    # Postgres runs as an unprivileged user when started as root: every folder above its data
    # must be searchable by that user (pytest's temporary folders are not).
    postgres_dir: Path | None = None
    issuer: str = "sitekit-cmp"


def _no_progress(message: str) -> None:
    pass


class Stack:
    def __init__(
        self, settings: StackSettings, progress: Callable[[str], None] = _no_progress
    ) -> None:
        self.settings = settings
        self.progress = progress
        self.root = settings.root
        self.ports = settings.ports
        self.secrets = Secrets.load_or_create(self.root / "secrets.json")
        self.processes: dict[str, ManagedProcess] = {}
        self._postgres: Any = None
        self.database_url = ""

    # URLs other parts and the tests use
    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def cmp_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.cmp}"

    @property
    def runtime_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.runtime}"

    @property
    def llm_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.mockllm}/v1"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports.kafka}"

    @property
    def jwks_url(self) -> str:
        return f"{self.cmp_url}/.well-known/jwks.json"

    def check_ports(self) -> None:
        taken = [
            f"{name} ({getattr(self.ports, name)})" for name in Ports.__slots__
            if not port_is_free(getattr(self.ports, name))
        ]
        if taken:
            raise StackError(
                "port(s) already in use: " + ", ".join(taken)
                + ". Stop what uses them, or set SITEKIT_PORT_<NAME> (see the README)."
            )

    def start(self) -> None:
        self.check_ports()
        self._step("postgres", self.start_postgres)
        for name in ("redis", "kafka", "mockllm", "runtime", "cmp", "gateway"):
            self._step(name, lambda n=name: self.start_process(n))  # type: ignore[misc]

    def _step(self, name: str, start: Callable[[], None]) -> None:
        began = time.monotonic()
        self.progress(f"  starting {name:<8} ...")
        start()
        self.progress(f"  {name:<8} ready in {time.monotonic() - began:.1f} s")

    def start_postgres(self) -> None:
        from pgserver import postgres_server

        data = self.settings.postgres_dir or self.root / "postgres"
        self._postgres = postgres_server.get_server(data, cleanup_mode="stop")
        self._postgres.psql(
            "SELECT 'CREATE DATABASE sitekit' WHERE NOT EXISTS"
            " (SELECT FROM pg_database WHERE datname = 'sitekit')\\gexec"
        )
        self.database_url = self._postgres.get_uri("sitekit")

    def process(self, name: str) -> ManagedProcess:
        if name not in self.processes:
            self.processes[name] = self._make(name)
        return self.processes[name]

    def start_process(self, name: str) -> None:
        process = self.process(name)
        process.start()
        process.wait_ready(90 if name in ("runtime", "gateway") else 30)
        if name == "kafka":
            run_coroutine(ensure_topic(self.kafka_bootstrap, self.settings.usage_topic))

    def _make(self, name: str) -> ManagedProcess:
        logs = self.root / "logs"
        p, s = self.ports, self.secrets
        if name == "redis":
            return services.redis(p.redis, self.root / "redis")
        if name == "kafka":
            return services.kafka(p.kafka, self.root / "kafka")
        if name == "mockllm":
            return services.python_service("mockllm", "runtime.mockllm", p.mockllm, logs, {
                "MOCKLLM_PORT": str(p.mockllm),
                "MOCKLLM_FIRST_TOKEN_MS": str(self.settings.llm_first_token_ms),
                "MOCKLLM_TOKENS_PER_S": str(self.settings.llm_tokens_per_s),
            })
        if name == "runtime":
            return services.python_service("runtime", "runtime", p.runtime, logs, {
                "RUNTIME_PORT": str(p.runtime),
                "RUNTIME_SERVICE_TOKEN": s.runtime_token,
                "RUNTIME_FLOWS_DIR": str(self.root / "runtime" / "flows"),
                "RUNTIME_LLM_BASE_URL": self.llm_url,
                "RUNTIME_LLM_API_KEY": "sk-mock",
            })
        if name == "cmp":
            return services.python_service("cmp", "cmp", p.cmp, logs, {
                "CMP_PORT": str(p.cmp),
                "CMP_DATABASE_URL": self.database_url,
                "CMP_REDIS_URL": self.redis_url,
                "CMP_SERVICE_TOKEN": s.cmp_token,
                "CMP_ISSUER": self.settings.issuer,
                "CMP_RUNTIME_URL": self.runtime_url,
                "CMP_RUNTIME_TOKEN": s.runtime_token,
                "CMP_WEBHOOK_SECRET": s.webhook_secret,
                "CMP_EMBEDDINGS_URL": self.llm_url,
            })
        if name == "gateway":
            return services.python_service("gateway", "gateway", p.gateway, logs, {
                "GATEWAY_PORT": str(p.gateway),
                "GATEWAY_WORKERS": str(self.settings.gateway_workers),
                "GATEWAY_REDIS_URL": self.redis_url,
                "GATEWAY_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                "GATEWAY_USAGE_TOPIC": self.settings.usage_topic,
                "GATEWAY_JWKS_URL": self.jwks_url,
                "GATEWAY_CMP_URL": self.cmp_url,
                "GATEWAY_CMP_TOKEN": s.cmp_token,
                "GATEWAY_RUNTIME_TOKEN": s.runtime_token,
                "GATEWAY_ISSUER": self.settings.issuer,
                "GATEWAY_SPOOL_DIR": str(self.root / "gateway" / "spool"),
                "GATEWAY_AUDIT_LOG": str(self.root / "logs" / "audit.jsonl"),
                "GATEWAY_INSTANCE": "gw-local",
            }, health_path="/readyz")
        raise StackError(f"no service named {name!r}")

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.progress(f"  stopping {name}")
            self.processes[name].stop()
        if self._postgres is not None:
            self.progress("  stopping postgres")
            self._postgres.cleanup()
            self._postgres = None


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even under a running event loop
    (test fixtures): it gets a thread and a loop of its own."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


async def ensure_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
