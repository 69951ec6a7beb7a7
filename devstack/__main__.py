"""`python -m devstack up`: start the embedded stack, seed the demo, wait for Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from devstack.demo_page import serve_demo
from devstack.procs import StackError, port_is_free
from devstack.seed import DEMO_TENANTS, seed_demo
from devstack.stack import Ports, Stack, StackSettings, run_coroutine


def _number(name: str, default: int, what: str, highest: int | None = None) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = 0
    if value < 1 or (highest is not None and value > highest):
        raise StackError(f"{name} must be {what}, got {raw!r}")
    return value


def _ports() -> Ports:
    defaults = Ports()
    return Ports(**{
        name: _number(f"SITEKIT_PORT_{name.upper()}", getattr(defaults, name),
                      "a port number (1 to 65535)", 65535)
        for name in Ports.__slots__
    })


def _print(message: str) -> None:
    print(message, flush=True)


def up(root: Path) -> int:
    workers = _number("GATEWAY_WORKERS", 2, "a whole number, at least 1")
    stack = Stack(StackSettings(root=root, ports=_ports(), gateway_workers=workers),
                  progress=_print)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    demo_port = urlsplit(DEMO_TENANTS[0][1]).port
    if demo_port is not None and not port_is_free(demo_port):
        raise StackError(f"port {demo_port} (the demo page, {DEMO_TENANTS[0][1]}) is in use")
    _print(f"Site Kit: starting the stack (data in {root})")
    try:
        stack.start()
        _print("  seeding the demo ...")
        demo = run_coroutine(seed_demo(stack))
        first = demo["tenants"][0]
        demo_page = serve_demo(stack.gateway_url, first)
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C or any failure stops the whole stack
        _print(f"\nstart failed: {exc}")
        stack.stop()
        return 1
    _print(f"""
Site Kit is up.
  gateway   {stack.gateway_url}   (metrics {stack.gateway_url}/metrics)
  cmp       {stack.cmp_url}   (JWKS {stack.jwks_url})
  runtime   {stack.runtime_url}   mock LLM {stack.llm_url}
  redis     {stack.redis_url}   kafka {stack.kafka_bootstrap}
  demo      {root / 'demo.json'}   logs {root / 'logs'}
  widget    {demo_page.origin}/   (a demo page of {first['name']} with the chat widget)

Stream an answer:
  curl -N {stack.gateway_url}/v1/agents/{first['agent_id']}/chat \\
    -H 'Authorization: Bearer {first['secret_key']}' \\
    -H 'Content-Type: application/json' -H 'Accept: text/event-stream' \\
    -d '{{"message": "Hello there"}}'

Call the CMP as {first['name']}'s owner (API described at {stack.cmp_url}/openapi.json):
  curl {stack.cmp_url}/api/customer-agent-configs \\
    -H 'Authorization: Bearer {first['cmp_token']}'

Ctrl-C stops everything.""")
    try:
        while not stopping.wait(1.0):
            for name, process in stack.processes.items():
                if not process.running:
                    _print(f"{name} stopped unexpectedly; see {process.log_path}")
                    stopping.set()
    except KeyboardInterrupt:
        pass
    _print("\nstopping ...")
    demo_page.stop()
    stack.stop()
    _print("stopped.")
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "up"
    root = Path(os.environ.get("SITEKIT_DATA_DIR", ".stack")).resolve()
    if command == "up":
        try:
            return up(root)
        except StackError as exc:
            print(f"make up: {exc}", file=sys.stderr)
            return 1
    print(f"devstack: unknown command {command!r} (up)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
