"""Start the runtime: `python -m runtime` (uvicorn on uvloop, RUNTIME_WORKERS processes)."""

from __future__ import annotations

import os
import sys

from starlette.applications import Starlette

from runtime.app import create_app
from runtime.config import ConfigError, RuntimeConfig, apply_engine_environment


def app_from_env() -> Starlette:
    """The app factory each uvicorn worker calls."""
    return create_app(RuntimeConfig.from_env())


def main() -> None:
    import uvicorn

    try:
        config = RuntimeConfig.from_env()
    except ConfigError as exc:
        sys.exit(f"runtime: {exc}")
    # lfx reads its allowlists from the environment; set them before any worker imports it.
    apply_engine_environment(config, os.environ)
    options = {
        "host": config.host, "port": config.port, "loop": "uvloop", "http": "httptools",
        "log_level": config.log_level, "access_log": False, "timeout_graceful_shutdown": 10,
    }
    if config.workers == 1:
        uvicorn.run(create_app(config), **options)  # type: ignore[arg-type]
    else:
        uvicorn.run("runtime.server:app_from_env", factory=True, workers=config.workers,
                    **options)  # type: ignore[arg-type]
