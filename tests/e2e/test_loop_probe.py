"""GATEWAY_LOOP_PROBE: a worker started with it answers as usual and, when it stops, writes how
late its event loop ran callbacks (what `make bench` reads for its tail profile)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import orjson

from devstack.stack import Stack
from tests.e2e.conftest import Tenant, auth, extra_gateway


async def test_a_probed_worker_reports_its_loop_delays_when_it_stops(
    stack: Stack, tenant: Tenant, tmp_path: Path,
) -> None:
    probe = tmp_path / "probe"
    with extra_gateway(stack, "gateway-probed", {"GATEWAY_LOOP_PROBE": str(probe)}) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for i in range(20):
                response = await client.post(tenant.chat_path, json={"message": f"hi {i}"},
                                             headers=auth(tenant.secret_key))
                assert response.status_code == 200, response.text
        assert os.listdir(tmp_path) == []  # written at shutdown, not before
    [name] = os.listdir(tmp_path)
    report = orjson.loads((tmp_path / name).read_bytes())
    assert name == f"probe.{report['pid']}.json" and report["probes"] > 0
    delays = report["delay_ms"]
    assert 0 <= delays["p50"] <= delays["p99"] <= delays["max"]
    assert isinstance(report["late_stacks"], list)
