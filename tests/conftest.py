"""Real services for the whole test session, on loopback, reset per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from devstack import services
from devstack.procs import ManagedProcess, free_port
from devstack.redis_cluster import ThreeShards


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


class RestartableService:
    """A session service that a fault test may stop and start again on the same port."""

    def __init__(self, process: ManagedProcess, url: str) -> None:
        self.process = process
        self.url = url

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(60)

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()


@pytest.fixture(scope="session")
def redis_service(stack_dir: Path) -> Iterator[RestartableService]:
    port = free_port()
    service = RestartableService(services.redis(port, stack_dir / "redis"), f"redis://127.0.0.1:{port}/0")
    service.start()
    yield service
    service.stop()


@pytest.fixture
async def redis_url(redis_service: RestartableService) -> AsyncIterator[str]:
    """A Redis emptied before each test (and started again if a fault test left it stopped)."""
    if not redis_service.process.running:
        redis_service.start()
    client = aioredis.from_url(redis_service.url)
    await client.flushall()
    await client.aclose()
    yield redis_service.url


@pytest.fixture(scope="session")
def kafka_service(stack_dir: Path) -> Iterator[RestartableService]:
    port = free_port()
    service = RestartableService(services.kafka(port, stack_dir / "kafka"), f"127.0.0.1:{port}")
    service.start()
    yield service
    service.stop()


@pytest.fixture
def kafka_bootstrap(kafka_service: RestartableService) -> str:
    """The broker's address; tests get a fresh topic each through `usage_topic`."""
    if not kafka_service.process.running:
        kafka_service.start()
    return kafka_service.url


_topic_counter = iter(range(1_000_000))


@pytest.fixture
def usage_topic() -> str:
    return f"agent-usage-t{next(_topic_counter)}"


@pytest.fixture(scope="session")
def open_dir() -> Iterator[Path]:
    """A folder every user can reach: Postgres runs as its own user when tests run as root."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sitekit-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(open_dir: Path) -> Iterator[object]:
    from pgserver import postgres_server

    server = postgres_server.get_server(open_dir / "pg", cleanup_mode="stop")
    yield server
    server.cleanup()


_db_counter = iter(range(1_000_000))


@pytest.fixture(scope="session")
async def migrated_template(postgres_server: object) -> str:
    """A database with every migration applied, copied for each test that needs one."""
    import asyncpg

    from cmp.migrate import migrate

    admin_url: str = postgres_server.get_uri()  # type: ignore[attr-defined]
    conn = await asyncpg.connect(admin_url)
    await conn.execute("CREATE DATABASE sitekit_template")
    await conn.close()
    conn = await asyncpg.connect(postgres_server.get_uri("sitekit_template"))  # type: ignore[attr-defined]
    await migrate(conn)
    await conn.close()
    return "sitekit_template"


@pytest.fixture
async def database_url(postgres_server: object, migrated_template: str) -> str:
    """A fresh, migrated database for one test."""
    import asyncpg

    name = f"sitekit_t{next(_db_counter)}"
    conn = await asyncpg.connect(postgres_server.get_uri())  # type: ignore[attr-defined]
    await conn.execute(f"CREATE DATABASE {name} TEMPLATE {migrated_template}")
    await conn.close()
    return str(postgres_server.get_uri(name))  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def stack(stack_dir: Path, open_dir: Path) -> Iterator[object]:
    """The whole stack (Postgres, Redis, Kafka, mock LLM, runtime, CMP, gateway) on free ports,
    with the demo flow deployed; tests make their own tenants so none sees another's state."""
    import httpx
    import orjson

    from devstack.seed import DEMO_FLOW, DEMO_FLOW_ID, deploy_flow
    from devstack.stack import Ports, Stack, StackSettings, run_coroutine

    settings = StackSettings(
        root=stack_dir / "full", ports=Ports.free(), gateway_workers=2,
        llm_first_token_ms=20, llm_tokens_per_s=400, postgres_dir=open_dir / "stack-pg",
    )
    running = Stack(settings)
    try:
        running.start()
        run_coroutine(deploy_flow(running.runtime_url, running.secrets.runtime_token, DEMO_FLOW_ID,
                                orjson.loads(DEMO_FLOW.read_bytes()), 1))
        httpx.get(f"{running.gateway_url}/readyz", timeout=5).raise_for_status()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
async def redis_cluster_service(stack_dir: Path) -> AsyncIterator[ThreeShards]:
    cluster = ThreeShards(stack_dir / "redis-cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture
async def redis_cluster(redis_cluster_service: ThreeShards) -> AsyncIterator[ThreeShards]:
    """A Redis Cluster of three primaries, emptied and with its first slot layout, per test."""
    await redis_cluster_service.reset()
    yield redis_cluster_service


@pytest.fixture
async def redis_cluster_client(
    redis_cluster: ThreeShards,
) -> AsyncIterator[aioredis.RedisCluster]:
    """redis-py's cluster client on `redis_cluster`, made as the gateway and the CMP make it."""
    from cmp.redis_clients import connect

    client = connect(redis_cluster.url, cluster=True, timeout=2, connect_timeout=2)
    assert isinstance(client, aioredis.RedisCluster)
    yield client
    await client.aclose()
