"""`make load`: loadtest/locustfile.py, headless and bounded in time, against the `make up` stack.

    .venv/bin/python -m loadtest.load

Reads `.stack/demo.json` (or `$SITEKIT_DATA_DIR/demo.json`) for the gateway URL and the demo
tenants. Settings, from the environment: SITEKIT_LOAD_USERS (50), SITEKIT_LOAD_SPAWN_RATE (10),
SITEKIT_LOAD_SECONDS (60), SITEKIT_LOAD_THINK_MIN_S / _MAX_S (1 / 5), SITEKIT_LOAD_BROWSER_SHARE
(0.5). Prints locust's statistics at the end; exits non-zero if the stack is not up or a
request failed (429s do not count as failures).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import orjson

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def setting(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"make load: {name} must be a whole number, got {raw!r}") from None
    if value < 1:
        raise SystemExit(f"make load: {name} must be at least 1, got {raw!r}")
    return value


def gateway_url(demo: Path) -> str:
    """The demo's gateway URL, once it answers /readyz; exits with a message otherwise."""
    if not demo.exists():
        raise SystemExit(f"make load: {demo} is missing: run make up first (in another terminal)")
    try:
        url = str(orjson.loads(demo.read_bytes())["gateway_url"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise SystemExit(f"make load: {demo} is not a demo file: run make up again") from None
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=3) as response:  # noqa: S310
            if response.status == 200:
                return url
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"make load: the gateway at {url} is not ready ({exc.code}): "
                         "wait for make up to finish, or run make up first") from None
    except OSError:
        pass
    raise SystemExit(f"make load: no gateway answers at {url}: run make up first")


def main() -> int:
    demo = Path(os.environ.get("SITEKIT_DATA_DIR", ".stack")).resolve() / "demo.json"
    url = gateway_url(demo)
    users = setting("SITEKIT_LOAD_USERS", 50)
    spawn_rate = setting("SITEKIT_LOAD_SPAWN_RATE", 10)
    seconds = setting("SITEKIT_LOAD_SECONDS", 60)
    print(f"make load: {users} users (spawning {spawn_rate}/s) for {seconds} s against {url}",
          flush=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", f"{seconds}s",
        "--stop-timeout", "10", "--only-summary", "--loglevel", "WARNING",
    ]
    try:
        done = subprocess.run(command, env={**os.environ, "SITEKIT_DEMO": str(demo)},
                              timeout=seconds + 90, check=False)
    except subprocess.TimeoutExpired:
        print("make load: locust did not stop in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
