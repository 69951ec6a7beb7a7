"""The runtime's HTTP API (internal; the gateway and the control plane hold the token).

    PUT    /flows/{flow_id}         {"version": int, "flow": <Langflow export>} -> 200
    DELETE /flows/{flow_id}         -> 204
    GET    /flows                   -> {"flows": [{"flow_id", "version"}]}
    POST   /flows/{flow_id}/stream  {"input_value", "session_id", "variables"} -> SSE
    GET    /healthz                 (no token)
    GET    /link                    WebSocket `sitekit-link.1`: the requests above, many at
                                    once over one connection (frames: runtime.link)

Errors are `{"error": {"code", "message"}}`; the codes come from runtime.errors.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from runtime.auth import ServiceTokenAuth
from runtime.components import ComponentCatalogue
from runtime.config import RuntimeConfig, apply_engine_environment
from runtime.engine import FlowEngine, RunRequest
from runtime.errors import InvalidRequest, PayloadTooLarge, RuntimeServiceError
from runtime.flow_store import FlowStore
from runtime.lfx_setup import prepare_lfx
from runtime.lfx_tuning import EngineTuning
from runtime.link import LinkEndpoint
from runtime.retrieval import TenantDocuments
from runtime.streaming import RunStream

MAX_FLOW_BYTES = 16 * 1024 * 1024
MAX_RUN_BYTES = 1024 * 1024
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def make_redactor(secret: str) -> Callable[[str], str]:
    """Error text leaves the runtime without URLs (they may carry keys) or the LLM key."""
    from lfx.utils.url_redaction import redact_urls_in_text

    def redact(text: str) -> str:
        text = redact_urls_in_text(text)
        return text.replace(secret, "***") if secret else text

    return redact


def settle_garbage_collector() -> None:
    """What the runtime holds once started (lfx, langchain, the component catalogue, the
    deployed flows: about half a million objects) lives as long as the process. Frozen, it is
    never scanned again. Measured in-process over 205 turns of the runtime's path
    (loadtest/bench_runtime.py's turns, two runs each way): a full collection took about
    260 ms of CPU over the whole heap, a pause every run in flight on the worker waits out,
    and about 40 ms once it is frozen; the collector's share of a turn fell from 3.3 to
    1.6 ms. Young collections keep their default pace: with 20,000 allocations between them
    instead of 700, more of a turn's graph was still alive at each, and they cost more in
    all."""
    gc.collect()
    gc.freeze()


class RuntimeAPI:
    """The route handlers; the engine they use is built in the app's lifespan."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self._engine: FlowEngine | None = None
        self._redact = make_redactor(config.llm_api_key)

    @property
    def engine(self) -> FlowEngine:
        if self._engine is None:
            raise RuntimeError("the runtime has not started")
        return self._engine

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        apply_engine_environment(self.config, os.environ)
        prepare_lfx(self.config.log_level)
        catalogue = await ComponentCatalogue.load()
        tuning = EngineTuning()
        tuning.install()
        store = FlowStore(self.config.flows_dir)
        store.prepare()
        documents = None
        if self.config.vectors_database_url:
            documents = await TenantDocuments.open(
                self.config.vectors_database_url, self.config.embeddings_url,
                self.config.embeddings_api_key, self.config.embeddings_model,
            )
        self._engine = FlowEngine(self.config, catalogue, store, documents)
        self._engine.load_stored()
        settle_garbage_collector()
        try:
            yield
        finally:
            self._engine = None
            await tuning.aclose()
            if documents is not None:
                await documents.aclose()

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok" if self._engine is not None else "starting"})

    async def list_flows(self, request: Request) -> Response:
        flows = [{"flow_id": f.flow_id, "version": f.version} for f in self.engine.list()]
        return json_response({"flows": flows})

    async def deploy(self, request: Request) -> Response:
        body = await read_json(request, MAX_FLOW_BYTES)
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidRequest("version must be a non-negative integer")
        deployed = self.engine.deploy(request.path_params["flow_id"], version, body.get("flow"))
        return json_response({"flow_id": deployed.flow_id, "version": deployed.version})

    async def undeploy(self, request: Request) -> Response:
        self.engine.undeploy(request.path_params["flow_id"])
        return Response(status_code=204)

    async def stream(self, request: Request) -> Response:
        flow = self.engine.get(request.path_params["flow_id"])
        body = await read_json(request, MAX_RUN_BYTES)
        input_value = body.get("input_value")
        session_id = body.get("session_id") or uuid.uuid4().hex
        variables = body.get("variables") or {}
        if not isinstance(input_value, str):
            raise InvalidRequest("input_value must be a string")
        if not isinstance(session_id, str) or not session_id.strip():
            raise InvalidRequest("session_id must be a non-empty string")
        if not isinstance(variables, dict) or not all(
            isinstance(v, str | int | float | bool) or v is None for v in variables.values()
        ):
            raise InvalidRequest("variables must be an object of scalar values")
        run = RunRequest(input_value, session_id, self.engine.request_variables(variables))
        return RunStream(self.engine, flow, run, self.config.run_timeout_s, self._redact)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RuntimeServiceError)
    return error_response(exc.status, exc.code, exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), exc.detail)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal_error", "the runtime failed to handle the request")


def create_app(config: RuntimeConfig) -> Starlette:
    api = RuntimeAPI(config)
    routes = [
        Route("/healthz", api.health, methods=["GET"]),
        Route("/flows", api.list_flows, methods=["GET"]),
        Route("/flows/{flow_id}", api.deploy, methods=["PUT"]),
        Route("/flows/{flow_id}", api.undeploy, methods=["DELETE"]),
        Route("/flows/{flow_id}/stream", api.stream, methods=["POST"]),
        WebSocketRoute("/link", LinkEndpoint()),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(ServiceTokenAuth, token=config.service_token)],
        exception_handlers={
            RuntimeServiceError: _service_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=api.lifespan,
    )
