"""`python -m cmp [serve|migrate|rotate-signing-key|retire-signing-key KID|create-user]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
import uvicorn

from cmp import identity
from cmp.app import build_app
from cmp.config import CmpConfig, ConfigError
from cmp.errors import CmpError
from cmp.migrate import migrate
from cmp.redis_clients import connect
from cmp.signing import retire_signing_key, rotate_signing_key


async def _create_user(config: CmpConfig, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(config.database_url)
    try:
        await migrate(conn)
        async with conn.transaction():
            user_id = await identity.create_user(
                conn, email=args.email, name=args.name, is_staff=args.staff
            )
            if args.org:
                org_id = await identity.create_organisation(
                    conn, name=args.org, kind=args.kind, owner=user_id
                )
                print(f"organisation {org_id} ({args.kind}), owner {args.email}")
            issued = await identity.create_token(conn, user_id, name="cli")
        print(f"user {user_id}; token (shown once): {issued.token}")
    finally:
        await conn.close()


async def _with_conn(config: CmpConfig, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(config.database_url)
    try:
        if args.command == "migrate":
            applied = await migrate(conn)
            print("applied: " + (", ".join(applied) if applied else "nothing, up to date"))
            return
        redis = connect(
            config.redis_url, cluster=config.redis_cluster, timeout=5, connect_timeout=5
        )
        try:
            if args.command == "retire-signing-key":
                await retire_signing_key(conn, redis, args.kid)
                print(f"retired signing key {args.kid}: API keys signed with it no longer "
                      "verify (gateways drop it at once, or within a minute without Redis)")
            else:
                key = await rotate_signing_key(conn, redis)
                print(f"new signing key {key.kid}; older keys stay in the JWKS until retired "
                      "(python -m cmp retire-signing-key KID)")
        finally:
            await redis.aclose()
    finally:
        await conn.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cmp", description="Site Kit control plane")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API (the default)")
    commands.add_parser("migrate", help="apply pending SQL migrations")
    commands.add_parser("rotate-signing-key", help="add a new signing key for API keys")
    retire = commands.add_parser(
        "retire-signing-key", help="drop a signing key: API keys signed with it stop working")
    retire.add_argument("kid", help="the key's id (the kid of the JWKS and of API keys)")
    user = commands.add_parser("create-user", help="create a user and print a token")
    user.add_argument("--email", required=True)
    user.add_argument("--name", default="")
    user.add_argument("--staff", action="store_true", help="platform staff")
    user.add_argument("--org", help="also create an organisation with this name, owned by them")
    user.add_argument("--kind", default="customer", choices=identity.ORG_KINDS)
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
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
    try:
        if command == "create-user":
            asyncio.run(_create_user(config, args))
        else:
            asyncio.run(_with_conn(config, args))
    except CmpError as exc:
        print(f"cmp: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
