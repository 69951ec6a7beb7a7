"""Errors of the runtime server, each carrying the code its HTTP API reports.

    RuntimeServiceError
    ├── InvalidRequest      400 invalid_request
    ├── PayloadTooLarge     413 payload_too_large
    ├── FlowNotFound        404 flow_not_found
    ├── InvalidFlow         422 invalid_flow
    └── RunError            `error` event runtime_error
        └── RunTimeout      `error` event runtime_timeout
"""

from __future__ import annotations


class RuntimeServiceError(Exception):
    code = "runtime_error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(RuntimeServiceError):
    code = "invalid_request"
    status = 400


class PayloadTooLarge(RuntimeServiceError):
    code = "payload_too_large"
    status = 413


class FlowNotFound(RuntimeServiceError):
    code = "flow_not_found"
    status = 404


class InvalidFlow(RuntimeServiceError):
    code = "invalid_flow"
    status = 422


class RunError(RuntimeServiceError):
    """A run that started and then failed; reported in the stream, not as a status."""

    code = "runtime_error"
    status = 502


class RunTimeout(RunError):
    code = "runtime_timeout"
    status = 504
