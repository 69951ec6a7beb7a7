"""`python -m gateway`: serve the gateway with GATEWAY_WORKERS worker processes."""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig


def main() -> int:
    try:
        config = GatewayConfig.from_env()
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here; /metrics on any worker sums them all.
        metrics_dir = Path(config.spool_dir).parent / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    _raise_open_files_limit()
    import uvicorn  # after the metrics directory is set: prometheus_client reads it at import

    from gateway.http import GatewayHttpProtocol

    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=config.host,
        port=config.port,
        workers=config.workers,
        loop="uvloop",
        http=GatewayHttpProtocol if config.http == "gateway" else "httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=math.ceil(config.drain_timeout_s),  # whole seconds: never less
        backlog=4096,
        # The gateway speaks to clients directly or behind a load balancer that terminates
        # them; it reads no forwarded-for headers, so the middleware would be pure cost.
        proxy_headers=False,
        server_header=False,
    )
    return 0


def _raise_open_files_limit() -> None:
    """Each open stream holds two sockets (client and runtime): take all the descriptors the
    hard limit allows rather than the usual soft 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    sys.exit(main())
