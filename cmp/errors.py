"""Errors of the control plane; the API maps each to its status in one place.

    CmpError
    ├── Unauthenticated  no token, or an unknown, expired or revoked one
    ├── Forbidden        the caller's role in its own organisation is too low
    ├── NotFound         the object does not exist for this tenant (existence never leaks)
    ├── Conflict         the change collides with the object's state (taken, already done)
    ├── InvalidInput     a field is wrong; `fields` names each problem
    ├── TooLarge         a body or upload over its limit
    └── Unavailable      a dependency (Redis, the runtime, the embeddings endpoint) is down
"""

from __future__ import annotations


class CmpError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class Unauthenticated(CmpError):
    status = 401
    code = "unauthenticated"


class Forbidden(CmpError):
    status = 403
    code = "forbidden"


class NotFound(CmpError):
    status = 404
    code = "not_found"


class Conflict(CmpError):
    status = 409
    code = "conflict"


class InvalidInput(CmpError):
    status = 422
    code = "invalid_request"


class TooLarge(CmpError):
    status = 413
    code = "too_large"


class Unavailable(CmpError):
    status = 503
    code = "unavailable"
