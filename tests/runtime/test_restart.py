"""Deployed flows survive a restart: a new runtime process on the same folder serves them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from devstack.procs import free_port
from tests.runtime.conftest import TOKEN, Service, runtime_process, stream_events


async def test_a_new_process_reloads_deployed_flows(
    stack_dir: Path, mock_llm: Service, demo_flow: dict[str, Any]
) -> None:
    flows_dir = stack_dir / "runtime-restart" / "flows"
    headers = {"authorization": f"Bearer {TOKEN}"}
    for generation in (1, 2):
        port = free_port()
        process = runtime_process(
            f"runtime-restart-{generation}", port, stack_dir / "runtime-restart", flows_dir,
            mock_llm.url,
        )
        process.start()
        try:
            process.wait_ready(120)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
            ) as client:
                if generation == 1:
                    deploy = {"version": 7, "flow": demo_flow}
                    assert (await client.put("/flows/kept", json=deploy)).status_code == 200
                    continue
                flows = (await client.get("/flows")).json()["flows"]
                assert flows == [{"flow_id": "kept", "version": 7}]
                events = await stream_events(client, "kept", "#tokens=5 still there?")
                assert events[-1][0] == "end"
                assert len([e for e in events if e[0] == "token"]) == 5
        finally:
            process.stop()
