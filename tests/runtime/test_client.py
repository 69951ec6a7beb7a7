"""The control plane's client of the runtime, against the real runtime."""

from __future__ import annotations

from typing import Any

import pytest

from devstack.procs import free_port
from runtime.client import (
    DeployedFlowInfo,
    FlowNotFoundError,
    InvalidFlowError,
    RuntimeClient,
    RuntimeUnauthorized,
    RuntimeUnavailable,
)
from tests.runtime.conftest import TOKEN, Service


async def test_deploy_list_undeploy_health(
    runtime_service: Service, demo_flow: dict[str, Any]
) -> None:
    async with RuntimeClient(runtime_service.url, TOKEN) as client:
        assert (await client.health())["status"] == "ok"
        info = await client.deploy("client-flow", 2, demo_flow)
        assert info == DeployedFlowInfo("client-flow", 2)
        assert DeployedFlowInfo("client-flow", 2) in await client.list_flows()
        await client.undeploy("client-flow")
        assert "client-flow" not in {f.flow_id for f in await client.list_flows()}
        with pytest.raises(FlowNotFoundError) as raised:
            await client.undeploy("client-flow")
        assert raised.value.status == 404 and raised.value.code == "flow_not_found"


async def test_errors_are_translated(runtime_service: Service, demo_flow: dict[str, Any]) -> None:
    demo_flow["data"]["nodes"][0]["data"]["type"] = "NotInstalled"
    async with RuntimeClient(runtime_service.url, TOKEN) as client:
        with pytest.raises(InvalidFlowError) as raised:
            await client.deploy("refused", 1, demo_flow)
        assert "NotInstalled" in raised.value.message
    async with RuntimeClient(runtime_service.url, "not-the-token-000000") as client:
        with pytest.raises(RuntimeUnauthorized):
            await client.list_flows()
    async with RuntimeClient(f"http://127.0.0.1:{free_port()}", TOKEN) as client:
        with pytest.raises(RuntimeUnavailable):
            await client.health()
