"""How an endpoint is declared. One `Operation` gives the route, the checks every request gets
(token, body type and size, JSON, fields, pagination) and its part of the OpenAPI document, so
the document cannot drift from what the endpoint does."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cmp.api.pages import Page, PageRequest
from cmp.api.webhook_signature import verify_webhook
from cmp.config import CmpConfig
from cmp.embeddings import EmbeddingsClient
from cmp.errors import CmpError, InvalidInput, NotFound, TooLarge, Unavailable
from cmp.identity import Caller, authenticate
from cmp.ids import parse_id
from cmp.provisioning import Provisioner
from cmp.redis_clients import AnyRedis

Auth = Literal["user", "public", "service", "webhook"]


@dataclass(frozen=True, slots=True)
class Services:
    """What handlers reach beyond their connection; created in the app's lifespan."""

    config: CmpConfig
    pool: asyncpg.Pool
    redis: AnyRedis
    provisioner: Provisioner
    embeddings: EmbeddingsClient


@dataclass
class Call:
    request: Request
    services: Services
    conn: asyncpg.Connection
    caller_or_none: Caller | None
    body: Any = None
    raw_body: bytes = b""
    query: Any = None
    page: PageRequest | None = None

    @property
    def caller(self) -> Caller:
        assert self.caller_or_none is not None, "operation declared without user auth"
        return self.caller_or_none

    def path_id(self, name: str, what: str) -> uuid.UUID:
        raw = self.request.path_params[name]
        parsed = parse_id(raw)
        if parsed is None:
            raise NotFound(f"no {what} {raw!r}")
        return parsed

    async def audit(
        self, action: str, object_type: str, object_id: object, org_id: uuid.UUID | None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record a write in the same transaction as the write itself."""
        await self.conn.execute(
            "INSERT INTO audit_log (actor_user_id, org_id, action, object_type, object_id,"
            " details) VALUES ($1, $2, $3, $4, $5, $6)",
            self.caller_or_none.user_id if self.caller_or_none else None, org_id, action,
            object_type, str(object_id), orjson.dumps(details or {}).decode(),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    summary: str
    handler: Handler
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None  # the item's model when `paged`
    status: int = 200
    paged: bool = False
    # How each value of this list's cursor is read back (the keyset's column types).
    cursor: tuple[Callable[[Any], Any], ...] = (uuid.UUID,)
    auth: Auth = "user"
    # Media types taken as a raw body (uploads); JSON operations leave this empty.
    raw_media_types: tuple[str, ...] = ()
    errors: tuple[int, ...] = ()

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


def error_body(exc: CmpError) -> dict[str, Any]:
    inner: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.fields:
        inner["fields"] = exc.fields
    return {"error": inner}


def error_response(exc: CmpError, headers: dict[str, str] | None = None) -> Response:
    return json_response(error_body(exc), exc.status, headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _field_errors(exc: ValidationError) -> dict[str, str]:
    fields: dict[str, str] = {}
    for problem in exc.errors(include_url=False, include_context=False):
        name = ".".join(str(part) for part in problem["loc"]) or "body"
        fields.setdefault(name, problem["msg"])
    return fields


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class UnsupportedMediaType(CmpError):
    status = 415
    code = "unsupported_media_type"


class MalformedBody(CmpError):
    status = 400
    code = "invalid_json"


def _parse_body(op: Operation, call: Call) -> None:
    media_type = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
    if op.raw_media_types and media_type in op.raw_media_types:
        return
    if op.body is None:
        return
    if media_type != "application/json":
        accepted = ", ".join(("application/json", *op.raw_media_types))
        raise UnsupportedMediaType(f"send the body as {accepted}")
    try:
        parsed = orjson.loads(call.raw_body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    try:
        call.body = op.body.model_validate(parsed)
    except ValidationError as exc:
        raise InvalidInput("some fields are invalid", fields=_field_errors(exc)) from None


def _parse_query(op: Operation, call: Call) -> None:
    params = call.request.query_params
    problems: dict[str, str] = {}
    if op.paged:
        try:
            call.page = PageRequest.parse(params.get("limit"), params.get("cursor"), op.cursor)
        except InvalidInput as exc:
            problems.update(exc.fields or {})
    if op.query is not None:
        wanted = {k: v for k, v in params.items() if k not in ("limit", "cursor")}
        try:
            call.query = op.query.model_validate(wanted)
        except ValidationError as exc:
            problems.update(_field_errors(exc))
    if problems:
        raise InvalidInput("some query parameters are invalid", fields=problems)


def _render(op: Operation, reply: Any) -> Response:
    if not isinstance(reply, Reply):
        reply = Reply(reply, op.status)
    body = reply.body
    if reply.status == 204:
        return Response(status_code=204, headers=reply.headers)
    if isinstance(body, (BaseModel, Page)):
        body = body.model_dump(mode="json")
    return json_response(body, reply.status, reply.headers)


def route(op: Operation, services_of: Callable[[Request], Services]) -> Route:
    async def endpoint(request: Request) -> Response:
        services = services_of(request)
        try:
            async with services.pool.acquire() as conn:
                caller = None
                if op.auth == "user":
                    caller = await authenticate(conn, request.headers.get("authorization"))
                call = Call(request, services, conn, caller)
                if op.method in ("POST", "PUT", "PATCH"):
                    call.raw_body = await _read_body(request, services.config.max_body_bytes)
                if op.auth == "webhook":
                    verify_webhook(request, call.raw_body, services.config.webhook_secret)
                _parse_query(op, call)
                _parse_body(op, call)
                reply = await op.handler(call)
        except CmpError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return error_response(exc, headers)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            return error_response(
                Unavailable(f"a dependency is unreachable, try again shortly: {exc}"),
                {"Retry-After": "5"},
            )
        return _render(op, reply)

    endpoint.__name__ = op.operation_id
    return Route(op.path, endpoint, methods=[op.method])
