"""Errors of the control plane.

    CmpError
    ├── NotFound        the object does not exist for this tenant (existence never leaks)
    ├── InvalidInput    a field is wrong; `fields` names each problem
    └── Unavailable     a dependency (Redis, the runtime) is down
"""

from __future__ import annotations


class CmpError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class NotFound(CmpError):
    status = 404
    code = "not_found"


class InvalidInput(CmpError):
    status = 422
    code = "invalid_request"


class Unavailable(CmpError):
    status = 503
    code = "unavailable"
