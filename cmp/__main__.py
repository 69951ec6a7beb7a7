"""`python -m cmp [serve|migrate|rotate-signing-key]`."""

from __future__ import annotations

import asyncio
import sys

import asyncpg
import redis.asyncio as aioredis
import uvicorn

from cmp.app import build_app
from cmp.config import CmpConfig, ConfigError
from cmp.migrate import migrate
from cmp.signing import rotate_signing_key


async def _with_conn(config: CmpConfig, command: str) -> None:
    conn = await asyncpg.connect(config.database_url)
    try:
        if command == "migrate":
            applied = await migrate(conn)
            print("applied: " + (", ".join(applied) if applied else "nothing, up to date"))
        else:
            redis = aioredis.from_url(config.redis_url, socket_timeout=5)
            try:
                key = await rotate_signing_key(conn, redis)
            finally:
                await redis.aclose()
            print(f"new signing key {key.kid}; older keys stay in the JWKS until retired")
    finally:
        await conn.close()


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "serve"
    try:
        config = CmpConfig.from_env()
    except ConfigError as exc:
        print(f"cmp: {exc}", file=sys.stderr)
        return 2
    if command == "serve":
        uvicorn.run(
            build_app(config), host=config.host, port=config.port,
            loop="uvloop", http="httptools", log_level="warning", lifespan="on",
        )
        return 0
    if command in ("migrate", "rotate-signing-key"):
        asyncio.run(_with_conn(config, command))
        return 0
    print(f"cmp: unknown command {command!r} (serve, migrate, rotate-signing-key)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
