"""The CMP's HTTP app: the REST API (`cmp.api`), its OpenAPI document, and what the gateways
need: the JWKS and the internal registry endpoint they fall back to on a Redis miss."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

import asyncpg
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cmp.api.openapi import build_document
from cmp.api.operation import Services, error_response, json_response, route
from cmp.api.routes import OPERATIONS
from cmp.apikeys import sync_revocations
from cmp.config import CmpConfig
from cmp.embeddings import EmbeddingsClient
from cmp.errors import CmpError, NotFound
from cmp.migrate import migrate
from cmp.provisioning import Provisioner
from cmp.redis_clients import AnyRedis, connect, synced_markers
from cmp.registry import load_instance, republish_all
from cmp.signing import active_signing_key, jwks

log = logging.getLogger("sitekit.cmp")


class MethodNotAllowed(CmpError):
    status = 405
    code = "method_not_allowed"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 answer in the API's error shape too."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed here"),
                              dict(exc.headers or {}))
    if exc.status_code == 404:
        return error_response(NotFound(f"no such path {request.url.path}"))
    error = CmpError(str(exc.detail))
    error.status = exc.status_code
    error.code = "http_error"
    return error_response(error)


async def _keep_redis_in_sync(
    pool: asyncpg.Pool, redis: AnyRedis, stopping: asyncio.Event
) -> None:
    """Publish every registry entry and revocation again whenever Redis has lost them (a
    restart without persistence, or a shard of a cluster that did), checked every second
    through marker keys (`synced_markers`)."""
    while not stopping.is_set():
        try:
            markers = await synced_markers(redis)
            present = [await redis.exists(marker) for marker in markers]
            if not all(present):
                async with pool.acquire() as conn:
                    entries = await republish_all(conn, redis)
                    revoked = await sync_revocations(conn, redis)
                for marker in markers:
                    await redis.set(marker, "1")
                log.info("published %d registry entries and %d revocations", entries, revoked)
        except (CmpError, RedisError, OSError) as exc:
            log.warning("cannot sync Redis yet: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 1.0)


def build_app(config: CmpConfig) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=10)
        redis = connect(
            config.redis_url, cluster=config.redis_cluster, timeout=2, connect_timeout=2
        )
        async with pool.acquire() as conn:
            await migrate(conn)
            await active_signing_key(conn)
        app.state.pool = pool
        app.state.redis = redis
        provisioner = Provisioner(config, pool, redis)
        embeddings = EmbeddingsClient.from_config(config)
        app.state.services = Services(
            config=config, pool=pool, redis=redis, provisioner=provisioner, embeddings=embeddings
        )
        # Background loops end when `stopping` is set, and are cancelled too: a client library
        # that swallows a cancellation mid-call must not keep the process from stopping.
        stopping = asyncio.Event()
        tasks = [
            asyncio.create_task(_keep_redis_in_sync(pool, redis, stopping)),
            asyncio.create_task(provisioner.run(stopping)),
        ]
        try:
            yield
        finally:
            stopping.set()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=10)
            await embeddings.aclose()
            await redis.aclose()
            await pool.close()

    async def healthz(request: Request) -> Response:
        async with request.app.state.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        return JSONResponse({"status": "ok"})

    async def jwks_endpoint(request: Request) -> Response:
        async with request.app.state.pool.acquire() as conn:
            body = await jwks(conn)
        return JSONResponse(body, headers={"Cache-Control": "public, max-age=60"})

    async def registry_entry(request: Request) -> Response:
        supplied = request.headers.get("authorization", "")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {config.service_token}".encode()):
            return JSONResponse(
                {"error": {"code": "unauthorized", "message": "service token required"}},
                status_code=401,
            )
        try:
            async with request.app.state.pool.acquire() as conn:
                instance = await load_instance(conn, request.path_params["agent_id"])
        except CmpError as exc:
            return error_response(exc)
        return JSONResponse(instance.registry_entry())

    document = build_document(OPERATIONS, title="Site Kit control plane", version="1")

    async def openapi(request: Request) -> Response:
        return json_response(document)

    def services_of(request: Request) -> Services:
        services: Services = request.app.state.services
        return services

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/openapi.json", openapi),
            Route("/.well-known/jwks.json", jwks_endpoint),
            Route("/internal/registry/{agent_id}", registry_entry),
            *(route(op, services_of) for op in OPERATIONS),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
