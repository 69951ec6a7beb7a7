"""The OpenAPI 3.1 document, built from the same `Operation`s and models that serve requests."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from cmp.api.operation import Operation
from cmp.api.pages import MAX_LIMIT

_PARAM = re.compile(r"{(\w+)}")
_REF = "#/components/schemas/{model}"

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "fields": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }},
}
_ERROR_TEXT = {
    400: "Malformed request", 401: "Missing, unknown, expired or revoked token",
    403: "Your role does not allow this", 404: "No such object among yours",
    409: "Conflicts with the object's state", 413: "Body over the size limit",
    415: "Unsupported media type", 422: "Invalid fields (a message per field)",
    503: "A dependency is unavailable; retry later",
}


def _schema_of(model: type[BaseModel], refs: dict[Any, Any], mode: str) -> dict[str, Any]:
    return dict(refs[(model, mode)])


def _paged(item_ref: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": item_ref},
            "next_cursor": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }


def _query_parameters(op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    if op.paged:
        params.append({"name": "limit", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}})
        params.append({"name": "cursor", "in": "query", "required": False,
                       "schema": {"type": "string"}})
    if op.query is not None:
        schema = op.query.model_json_schema()
        for name, prop in schema.get("properties", {}).items():
            prop = dict(prop)
            prop.pop("title", None)
            if "anyOf" in prop:  # optional filters: the query string has no null
                prop = next(p for p in prop["anyOf"] if p.get("type") != "null")
            params.append({"name": name, "in": "query",
                           "required": name in schema.get("required", []), "schema": prop})
    return params


def build_document(operations: Sequence[Operation], *, title: str, version: str) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = []
    for op in operations:
        if op.body is not None:
            models.append((op.body, "validation"))
        if op.response is not None:
            models.append((op.response, "serialization"))
    refs, defs = models_json_schema(models, ref_template=_REF)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["Error"] = _ERROR_SCHEMA

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        item: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _PARAM.findall(op.path)
            ] + _query_parameters(op),
            "responses": {},
        }
        if op.auth == "user":
            item["security"] = [{"bearer": []}]
        elif op.auth == "service":
            item["security"] = [{"service": []}]
        else:
            item["security"] = []
        if op.body is not None or op.raw_media_types:
            content: dict[str, Any] = {}
            if op.body is not None:
                content["application/json"] = {"schema": _schema_of(op.body, refs, "validation")}
            for media_type in op.raw_media_types:
                content[media_type] = {"schema": {"type": "string", "format": "binary"}}
            item["requestBody"] = {"required": True, "content": content}
        if op.status == 204:
            item["responses"]["204"] = {"description": "Done"}
        else:
            schema: dict[str, Any] = {}
            if op.response is not None:
                schema = _schema_of(op.response, refs, "serialization")
                if op.paged:
                    schema = _paged(schema)
            item["responses"][str(op.status)] = {
                "description": op.summary,
                "content": {"application/json": {"schema": schema}},
            }
        for status in _error_statuses(op):
            item["responses"][str(status)] = {
                "description": _ERROR_TEXT[status],
                "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
            }
        paths.setdefault(op.path, {})[op.method.lower()] = item

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a user token (skt_...)"},
                "service": {"type": "http", "scheme": "bearer",
                            "description": "the service token shared with gateways"},
            },
        },
    }


def _error_statuses(op: Operation) -> list[int]:
    statuses = set(op.errors) | {503}
    if op.auth in ("user", "service", "webhook"):
        statuses.add(401)
    if _PARAM.search(op.path):
        statuses.add(404)
    if op.paged or op.query is not None or op.body is not None:
        statuses.add(422)
    if op.body is not None or op.raw_media_types:
        statuses |= {400, 413, 415, 422}
    return sorted(statuses)
