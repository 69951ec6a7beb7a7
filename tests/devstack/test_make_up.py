"""`make up` as a person runs it: `python -m devstack up` in a process of its own, with its data
under a temporary folder and every service on a free port; a chat as the README's curl sends it;
Ctrl-C; and a second run on the same data."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import psutil
import pytest

from devstack.procs import port_is_free
from devstack.seed import DEMO_TENANTS
from devstack.stack import Ports
from tests.e2e.conftest import sse_events

REPO = Path(__file__).resolve().parents[2]
READY = "Site Kit is up."
DEMO_PAGE_PORT = urlsplit(DEMO_TENANTS[0][1]).port or 0
# Settings of the caller's shell that would reach the stack's services.
STACK_PREFIXES = ("SITEKIT_", "GATEWAY_", "CMP_", "RUNTIME_", "MOCKLLM_", "PROMETHEUS_")


def make_up_env(root: Path, ports: Ports, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(STACK_PREFIXES)}
    env["SITEKIT_DATA_DIR"] = str(root)
    env.update({f"SITEKIT_PORT_{name.upper()}": str(getattr(ports, name))
                for name in Ports.__slots__})
    return {**env, **extra}


def _interruptible() -> None:
    """Ctrl-C reaches `make up` even when the tests run with SIGINT ignored (a background job
    of a script): Python only turns SIGINT into KeyboardInterrupt if it starts with SIG_DFL."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class MakeUp:
    """One `python -m devstack up`, its output collected line by line."""

    def __init__(self, root: Path, ports: Ports) -> None:
        self.root = root
        self.ports = ports
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.popen = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "devstack", "up"], cwd=REPO, env=make_up_env(root, ports),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, preexec_fn=_interruptible,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY):
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 240) -> None:
        self._ready.wait(timeout)
        assert self.popen.poll() is None and READY in self.lines, (
            f"make up did not report ready:\n{self.output}")

    def demo(self) -> dict[str, Any]:
        demo: dict[str, Any] = orjson.loads((self.root / "demo.json").read_bytes())
        return demo

    def processes(self) -> set[psutil.Process]:
        """Every process this run started: its descendants, and PostgreSQL, which pg_ctl
        detaches (found by its data folder) with its own children."""
        found = set()
        with contextlib.suppress(psutil.NoSuchProcess):  # it has exited and been waited for
            found.update(psutil.Process(self.popen.pid).children(recursive=True))
        for process in psutil.process_iter(["cmdline"]):
            if str(self.root) in " ".join(process.info["cmdline"] or ()):
                found.add(process)
                with contextlib.suppress(psutil.NoSuchProcess):
                    found.update(process.children(recursive=True))
        return {process for process in found if process.pid != self.popen.pid}

    def interrupt(self, timeout: float = 90) -> int:
        """Ctrl-C, and wait until it has stopped everything."""
        self.popen.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        """Its exit code, once all it printed is read."""
        code = self.popen.wait(timeout)
        self._reader.join(10)
        return code

    def kill_what_is_left(self, processes: set[psutil.Process]) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


@contextlib.contextmanager
def make_up(root: Path, ports: Ports) -> Iterator[MakeUp]:
    """A running `make up`; a test that fails on the way still stops it and all it started."""
    run = MakeUp(root, ports)
    try:
        yield run
    finally:
        if run.popen.poll() is None:
            started = run.processes()
            try:
                run.interrupt()
            except subprocess.TimeoutExpired:
                run.kill_what_is_left(started)


def alive(processes: set[psutil.Process]) -> list[str]:
    left = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            # A zombie holds no port or memory; it waits for init to collect it.
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())}")
    return left


def ports_in_use(ports: Ports) -> list[int]:
    numbers = [*(getattr(ports, name) for name in Ports.__slots__), DEMO_PAGE_PORT]
    return [port for port in numbers if not port_is_free(port)]


def stream_chat(demo: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The README's curl: the first demo tenant's secret key, streamed."""
    tenant = demo["tenants"][0]
    with httpx.stream(
        "POST", f"{demo['gateway_url']}/v1/agents/{tenant['agent_id']}/chat",
        headers={"Authorization": f"Bearer {tenant['secret_key']}",
                 "Content-Type": "application/json", "Accept": "text/event-stream"},
        content=orjson.dumps({"message": "Hello there #tokens=5"}), timeout=30,
    ) as response:
        body = "".join(response.iter_text())
    assert response.status_code == 200, body
    return sse_events(body)


def stop_and_check_nothing_is_left(run: MakeUp) -> None:
    started = run.processes()
    assert {"redis-server", "postgres"} <= {process.name() for process in started}
    assert run.interrupt() == 0, run.output
    assert run.lines[-1] == "stopped."
    assert alive(started) == []
    assert alive(run.processes()) == []
    assert ports_in_use(run.ports) == []


def assert_make_load_runs(root: Path, ports: Ports) -> None:
    """`make load` against this stack, short: widget-like users chat with no failure."""
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "loadtest.load"], cwd=REPO, capture_output=True, text=True,
        timeout=120, check=False, env=make_up_env(
            root, ports, SITEKIT_LOAD_USERS="4", SITEKIT_LOAD_SPAWN_RATE="4",
            SITEKIT_LOAD_SECONDS="6", SITEKIT_LOAD_THINK_MIN_S="0.2",
            SITEKIT_LOAD_THINK_MAX_S="0.5"),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "make load: 4 users (spawning 4/s) for 6 s against http://127.0.0.1:" in output
    aggregated = [line.split() for line in output.splitlines() if "Aggregated" in line]
    assert aggregated, output
    requests, failures = int(aggregated[0][1]), aggregated[0][2]
    assert requests >= 4 and failures.startswith("0("), output


@contextlib.contextmanager
def socket_on(port: int) -> Iterator[None]:
    """Something else listening on `port`."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield


@pytest.fixture
def demo_page_port_free() -> None:
    if not port_is_free(DEMO_PAGE_PORT):
        pytest.skip(f"port {DEMO_PAGE_PORT} (make up's demo page) is in use: a make up running?")


@pytest.fixture
def root(open_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A data folder that PostgreSQL's own user can reach (the tests may run as root)."""
    path = open_dir / str(request.node.name)
    path.mkdir(mode=0o755)
    return path


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("demo_page_port_free")
def test_make_up_streams_a_chat_stops_on_ctrl_c_and_reuses_its_demo(root: Path) -> None:
    with make_up(root, Ports.free()) as first:
        first.wait_ready()
        demo = first.demo()
        assert demo["gateway_url"] == f"http://127.0.0.1:{first.ports.gateway}"
        events = stream_chat(demo)
        assert events[-1][0] == "end" and {name for name, _ in events[:-1]} == {"token"}
        assert_make_load_runs(root, first.ports)
        stop_and_check_nothing_is_left(first)

    # Other ports, the runtime's among them: the same demo must follow.
    ports = Ports.free()
    while ports.runtime == first.ports.runtime:
        ports = dataclasses.replace(ports, runtime=Ports.free().runtime)
    with make_up(root, ports) as second:
        second.wait_ready()
        again = second.demo()
        assert again["tenants"] == demo["tenants"] and again["provider"] == demo["provider"]
        assert again["gateway_url"] == f"http://127.0.0.1:{ports.gateway}"
        assert again["cmp_url"] == f"http://127.0.0.1:{ports.cmp}"
        assert again["jwks_url"] == f"http://127.0.0.1:{ports.cmp}/.well-known/jwks.json"
        assert "2 agent(s) moved to the runtime" in second.output
        assert stream_chat(again)[-1][0] == "end"
        stop_and_check_nothing_is_left(second)


@pytest.mark.usefixtures("demo_page_port_free")
def test_make_up_names_a_port_in_use_and_starts_nothing(root: Path) -> None:
    ports = Ports.free()
    with socket_on(ports.gateway), make_up(root, ports) as run:
        assert run.wait(60) == 1
        assert (f"start failed: port(s) already in use: gateway ({ports.gateway}). Stop what"
                " uses them, or set SITEKIT_PORT_<NAME> (see the README).") in run.lines
        assert alive(run.processes()) == []


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SITEKIT_PORT_CMP", "80801", "SITEKIT_PORT_CMP must be a port number (1 to 65535)"),
    ("SITEKIT_PORT_REDIS", "redis", "SITEKIT_PORT_REDIS must be a port number (1 to 65535)"),
    ("GATEWAY_WORKERS", "0", "GATEWAY_WORKERS must be a whole number, at least 1"),
])
def test_make_up_refuses_a_bad_setting(root: Path, name: str, value: str, message: str) -> None:
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "devstack", "up"], cwd=REPO, capture_output=True, text=True,
        env=make_up_env(root, Ports.free(), **{name: value}), timeout=60, check=False,
    )
    assert done.returncode == 1
    assert done.stderr.endswith(f"make up: {message}, got {value!r}\n"), done.stderr
