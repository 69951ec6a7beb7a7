"""The gateway ASGI app, built from one GatewayConfig; clients and pools live in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cmp import redis_clients
from gateway.access import Gatekeeper
from gateway.agent_config import AgentConfigEndpoint, Preflight
from gateway.audit import AuditLog
from gateway.busy_poll import BusyPoll
from gateway.changes import ChangeListener, RevokedKeys
from gateway.chat import ChatEndpoint
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.keys import Jwks, KeyVerifier
from gateway.link import LinkPool, LinkSettings
from gateway.loop_probe import LoopProbe
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.observe import Deferred, Front
from gateway.registry import RegistryCache
from gateway.relay import Relay
from gateway.responses import ASGIApp, Receive, Scope, Send
from gateway.upstream import RuntimeCaller, UpstreamPool, UpstreamSettings
from gateway.usage import UsageEmitter
from gateway.widget_bundle import WidgetBundle, WidgetEndpoint
from ratelimit import BucketLimiter, ClusterLimiter, Limiter

log = logging.getLogger("sitekit.gateway")


@dataclass(slots=True)
class Readiness:
    """What /readyz looks at: the signing keys are loaded and the change feed is live."""

    jwks: Jwks
    listener: ChangeListener


def build_app(config: GatewayConfig) -> Front:
    metrics = GatewayMetrics()
    chat, agent_config, preflight = Deferred(), Deferred(), Deferred()
    state: dict[str, Readiness] = {}
    widget = WidgetBundle.read(config.widget_bundle)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            audit = AuditLog(config.audit_log)
            audit.open()
            stack.callback(audit.close)
            redis = redis_clients.connect(
                config.redis_url, cluster=config.redis_cluster, timeout=config.redis_timeout_s,
                connect_timeout=config.connect_timeout_s,
            )
            stack.push_async_callback(redis.aclose)
            cmp = httpx.AsyncClient(
                base_url=config.cmp_url,
                timeout=httpx.Timeout(2.0, connect=config.connect_timeout_s),
            )
            stack.push_async_callback(cmp.aclose)
            jwks = Jwks(config.jwks_url, cmp, config.jwks_refetch_interval_s)
            verifier = KeyVerifier(jwks, issuer=config.issuer, cache_size=config.key_cache_size)
            registry = RegistryCache(
                redis, cmp, config.cmp_token, timeout=config.redis_timeout_s
            )
            revoked = RevokedKeys()
            async def refresh_jwks() -> None:
                with contextlib.suppress(GatewayError):
                    await jwks.refresh(force=True)
                    verifier.forget_kids_except(jwks.kids)

            listener = ChangeListener(redis, registry, revoked, refresh_jwks)
            limiter: Limiter = (ClusterLimiter if config.redis_cluster else BucketLimiter).from_url(
                config.redis_url, timeout=config.redis_timeout_s
            )
            stack.push_async_callback(limiter.aclose)
            upstream: RuntimeCaller = UpstreamPool(UpstreamSettings(
                connect_timeout_s=config.connect_timeout_s,
                first_byte_timeout_s=config.run_timeout_s,
                read_timeout_s=config.run_timeout_s,
            ))
            if config.runtime_transport == "link":  # over HTTP/1.1 where the link is not served
                upstream = LinkPool(LinkSettings(
                    connect_timeout_s=config.connect_timeout_s,
                    first_byte_timeout_s=config.run_timeout_s,
                    read_timeout_s=config.run_timeout_s,
                ), authorization=f"Bearer {config.runtime_token}".encode(), fallback=upstream)
            stack.push_async_callback(upstream.aclose)
            usage = UsageEmitter(
                bootstrap_servers=config.kafka_bootstrap,
                topic=config.usage_topic,
                spool_dir=config.spool_dir,
                instance=config.instance,
            )
            await usage.start()
            stack.push_async_callback(usage.close, config.drain_timeout_s)
            gatekeeper = Gatekeeper(verifier, revoked, registry, audit, metrics)
            relay = Relay(upstream, usage, metrics, runtime_token=config.runtime_token)
            chats = ChatEndpoint(
                gatekeeper, limiter, relay, metrics,
                max_body_bytes=config.max_body_bytes,
                max_message_chars=config.max_message_chars,
                run_ahead=config.run_ahead,
                busy_poll=BusyPoll(asyncio.get_running_loop(), config.busy_poll_s)
                if config.busy_poll_s > 0 else None,
            )
            chat.handler = chats
            agent_config.handler = AgentConfigEndpoint(gatekeeper)
            preflight.handler = Preflight(registry, audit, metrics)
            state["readiness"] = Readiness(jwks, listener)
            tasks = [
                asyncio.create_task(listener.run()),
                asyncio.create_task(_keep_jwks_fresh(jwks, verifier)),
                asyncio.create_task(_report_counts(usage, limiter, relay, chats, metrics)),
            ]
            with contextlib.suppress(TimeoutError):
                # Start serving even if a dependency is late: readiness says when all is there.
                await asyncio.wait_for(listener.ready.wait(), 5)
            _settle_garbage_collector()
            if config.loop_probe is not None:
                probe = LoopProbe(asyncio.get_running_loop())
                probe.start()
                stack.callback(_write_probe_report, probe, config.loop_probe)
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        readiness = state.get("readiness")
        checks = {
            "jwks": readiness is not None and readiness.jwks.loaded,
            "redis": readiness is not None and readiness.listener.connected,
        }
        ready = all(checks.values())
        return Response(
            orjson.dumps({"ready": ready, "checks": checks}),
            status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": "1"},
            media_type="application/json",
        )

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app = Starlette(
        routes=[
            # Chats go straight from Front to their handler; POST is here for 405's Allow.
            Route("/v1/agents/{agent_id}/chat", _ByMethod({"POST": chat, "OPTIONS": preflight}),
                  methods=["POST", "OPTIONS"]),
            Route("/v1/agents/{agent_id}/config", _ByMethod({
                "GET": agent_config, "HEAD": agent_config, "OPTIONS": preflight}),
                methods=["GET", "OPTIONS"]),
            Route("/widget.js", WidgetEndpoint(widget), methods=["GET"]),
            Route("/widget/{version}/widget.js", WidgetEndpoint(widget, versioned=True),
                  methods=["GET"]),
            Route("/widget.json", WidgetEndpoint(widget, manifest=True), methods=["GET"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ],
        lifespan=lifespan,
        exception_handlers={404: _no_route, 405: _no_route},
    )
    return Front(app, chat, metrics)


class _ByMethod:
    """One route's endpoints by method, so that a 405 lists every method the path takes."""

    def __init__(self, endpoints: dict[str, ASGIApp]) -> None:
        self._endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._endpoints[scope["method"]](scope, receive, send)


async def _no_route(request: Request, exc: Exception) -> Response:
    """The contract's error body for a path or method the gateway does not serve."""
    assert isinstance(exc, HTTPException)
    error = (MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
             if exc.status_code == 405 else NotFound(f"no such path: {request.url.path}"))
    return Response(error.body(request.state.request_id), status_code=error.status,
                    headers=exc.headers, media_type="application/json")


def _settle_garbage_collector() -> None:
    """What the worker holds once started (modules, clients, pools) lives as long as it does:
    frozen, it is never scanned again, so a full collection costs what the requests in flight
    hold instead of the whole heap. A request allocates a few hundred objects, nearly all gone
    when it ends, so young collections run per few thousand allocations instead of per 700."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


_GC_YOUNG_THRESHOLD = 20_000


def _write_probe_report(probe: LoopProbe, path: Path) -> None:
    """At shutdown: the worker's report as `<path>.<pid>.json`."""
    probe.stop()
    report = probe.report()
    target = Path(f"{path}.{report['pid']}.json")
    try:
        target.write_bytes(orjson.dumps(report))
    except OSError:  # the rest of the shutdown goes on
        log.exception("cannot write the loop probe's report to %s", target)


async def _keep_jwks_fresh(jwks: Jwks, verifier: KeyVerifier) -> None:
    """Load the JWKS (retrying until the CMP answers), then refresh it every minute so a
    retired signing key stops working everywhere."""
    delay = 0.2
    while True:
        try:
            await jwks.refresh(force=True)
            verifier.forget_kids_except(jwks.kids)
            delay = 60.0
        except GatewayError as exc:
            log.warning("%s; retrying", exc.message)
            delay = min(max(delay * 2, 0.2), 5.0) if not jwks.loaded else 5.0
        await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))


_DELIVERY_STEPS = ("accepted", "sent", "spooled", "replayed", "failed", "dropped")


async def _report_counts(
    usage: UsageEmitter, limiter: Limiter, relay: Relay, chats: ChatEndpoint,
    metrics: GatewayMetrics,
) -> None:
    """Copy the emitter's, limiter's and chat endpoint's plain counters into Prometheus once a
    second, so the hot path only bumps integers."""
    reported: dict[str, int] = {}

    def advance(name: str, now: int, counter: Counter) -> None:
        delta = now - reported.get(name, 0)
        if delta > 0:
            counter.inc(delta)
            reported[name] = now

    while True:
        metrics.spool_depth.set(usage.spool_depth)
        metrics.open_streams.set(relay.open_streams)
        advance("round_trips", limiter.round_trips, metrics.redis_round_trips)
        advance("checks", limiter.checks, metrics.limiter_checks)
        for decision, count in chats.started_ahead.items():
            advance(f"ahead {decision}", count, metrics.ahead.labels(decision))
        for step in _DELIVERY_STEPS:
            advance(step, getattr(usage.counters, step), metrics.usage_delivery.labels(step))
        await asyncio.sleep(1.0)


def create_app() -> Front:
    """Factory for ASGI servers: configuration from the environment."""
    return build_app(GatewayConfig.from_env())
