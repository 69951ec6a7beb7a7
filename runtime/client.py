"""An async client of the runtime's flow API, for the control plane.

    RuntimeClientError
    ├── RuntimeUnavailable        no answer: connection refused or reset, timeout
    └── RuntimeRequestError       the runtime answered with an error (.status, .code)
        ├── RuntimeUnauthorized   401, the service token was refused
        ├── FlowNotFoundError     404, no such flow
        └── InvalidFlowError      422, the flow was refused (message names the nodes)

Every call has a timeout (`DEFAULT_TIMEOUT` unless given); nothing is retried here, the
caller knows whether a deploy may be repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

DEFAULT_TIMEOUT = httpx.Timeout(connect=2.0, read=30.0, write=30.0, pool=5.0)


class RuntimeClientError(Exception):
    """Base of every error this client raises."""


class RuntimeUnavailable(RuntimeClientError):
    """The runtime could not be reached or did not answer in time."""


class RuntimeRequestError(RuntimeClientError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class RuntimeUnauthorized(RuntimeRequestError):
    pass


class FlowNotFoundError(RuntimeRequestError):
    pass


class InvalidFlowError(RuntimeRequestError):
    pass


_ERRORS_BY_STATUS: dict[int, type[RuntimeRequestError]] = {
    401: RuntimeUnauthorized,
    404: FlowNotFoundError,
    422: InvalidFlowError,
}


@dataclass(frozen=True, slots=True)
class DeployedFlowInfo:
    flow_id: str
    version: int


class RuntimeClient:
    """One runtime (a `runtime_url`); use as an async context manager or call `aclose()`."""

    def __init__(
        self, base_url: str, token: str, *, timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
            headers={"authorization": f"Bearer {token}"},
        )

    async def __aenter__(self) -> RuntimeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self._request("GET", "/healthz")).json()
        return body

    async def deploy(self, flow_id: str, version: int, flow: dict[str, Any]) -> DeployedFlowInfo:
        response = await self._request(
            "PUT", f"/flows/{flow_id}", json={"version": version, "flow": flow}
        )
        body = response.json()
        return DeployedFlowInfo(flow_id=body["flow_id"], version=body["version"])

    async def undeploy(self, flow_id: str) -> None:
        await self._request("DELETE", f"/flows/{flow_id}")

    async def list_flows(self) -> list[DeployedFlowInfo]:
        body = (await self._request("GET", "/flows")).json()
        return [DeployedFlowInfo(f["flow_id"], f["version"]) for f in body["flows"]]

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            message = f"{method} {path}: the runtime did not answer in time"
            raise RuntimeUnavailable(message) from exc
        except httpx.TransportError as exc:
            raise RuntimeUnavailable(f"{method} {path}: {exc!r}") from exc
        if response.is_success:
            return response
        code, message = "error", response.text[:500]
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            pass
        raise _ERRORS_BY_STATUS.get(response.status_code, RuntimeRequestError)(
            response.status_code, code, message
        )
