"""Errors the gateway answers with, each mapped to its status and code in one place.

    GatewayError
    ├── InvalidRequest        400 invalid_request
    │   └── MethodNotAllowed  405 invalid_request
    ├── InvalidKey            401 invalid_key
    ├── Forbidden             403 forbidden
    ├── NotFound              404 not_found
    ├── PayloadTooLarge       413 payload_too_large
    ├── UnsupportedMediaType  415 unsupported_media_type
    ├── RateLimited           429 rate_limited
    ├── RuntimeFailure        502 runtime_error
    ├── Unavailable           503 unavailable
    └── RuntimeTimeout        504 runtime_timeout
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or []

    def body(self, request_id: str) -> bytes:
        return orjson.dumps(
            {"error": {"code": self.code, "message": self.message, "request_id": request_id}}
        )


class InvalidRequest(GatewayError):
    status = 400
    code = "invalid_request"


class MethodNotAllowed(InvalidRequest):
    status = 405


class InvalidKey(GatewayError):
    status = 401
    code = "invalid_key"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"


class RuntimeFailure(GatewayError):
    status = 502
    code = "runtime_error"


class Unavailable(GatewayError):
    """A dependency is down; the answer says when to retry (1 s unless the raiser knows)."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = headers or []
        if not any(name == b"retry-after" for name, _ in headers):
            headers = [*headers, (b"retry-after", b"1")]
        super().__init__(message, headers=headers)


class RuntimeTimeout(GatewayError):
    status = 504
    code = "runtime_timeout"
