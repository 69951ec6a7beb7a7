"""The CMP's benchmark: list endpoints over a large tenant, and an order's way to its first token.

    .venv/bin/python -m loadtest.bench_cmp [--configs 100000] [--usage 1000000] [--requests 200]

Starts the embedded stack on free ports in a temporary folder, then:

- loads one buyer organisation with `--configs` agent configs (and their orders) and
  `--usage` usage events spread over those agents and 365 days, straight into Postgres;
- times each list endpoint (sequential requests over HTTP, p50 and p99) on its first page and
  on pages deep into the list (a cursor half-way, and the last page), so keyset pagination
  shows whether it stays flat;
- times orders from the signed order-approved webhook to the first streamed token: webhook,
  provisioning (deploy to the runtime, registry entry), a key, then a chat through the gateway.

Prints one JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from cmp.api.pages import encode_cursor
from devstack.marketplace import CmpClient, approve_order, create_owner
from devstack.seed import DEMO_FLOW
from devstack.stack import Ports, Stack, StackSettings
from loadtest.loadgen import percentiles


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def bulk_load(database_url: str, org_id: str, provider_agent_id: str, configs: int,
                    usage: int) -> dict[str, float]:
    conn = await asyncpg.connect(database_url)
    try:
        started = time.monotonic()
        await conn.execute(
            "INSERT INTO orders (order_id, customer_org_id, provider_agent_id, flow_version,"
            " status) SELECT gen_random_uuid(), $1, $2, 1, 'approved'"
            " FROM generate_series(1, $3)", org_id, provider_agent_id, configs,
        )
        await conn.execute(
            "INSERT INTO customer_agent_configs (agent_id, tenant_id, order_id,"
            " provider_agent_id, flow_version, display_name, limits, provisioning)"
            " SELECT gen_random_uuid(), customer_org_id, order_id, provider_agent_id, 1,"
            " 'Bulk agent', '{}', 'active' FROM orders WHERE customer_org_id = $1", org_id,
        )
        loaded_configs = time.monotonic() - started
        # Usage over 1,000 of the agents (a busy subset) and a year of days. The rollups are
        # built in one pass after the load (the per-row trigger is timed on its own below).
        await conn.execute(
            "CREATE TEMP TABLE busy AS SELECT agent_id, row_number() OVER () AS n"
            " FROM customer_agent_configs WHERE tenant_id = $1 LIMIT 1000", org_id,
        )
        async with conn.transaction():
            await conn.execute("ALTER TABLE usage_events DISABLE TRIGGER usage_events_daily")
            await conn.execute(
                "INSERT INTO usage_events (event_id, tenant_id, agent_id, status, input_tokens,"
                " output_tokens, duration_ms, occurred_at)"
                " SELECT gen_random_uuid(), $1, b.agent_id, 'completed', 12, 40, 300,"
                "  now() - make_interval(days => (g % 365)::int, secs => (g % 86400)::int)"
                " FROM generate_series(1, $2) g JOIN busy b ON b.n = 1 + g % 1000",
                org_id, usage,
            )
            await conn.execute(
                "INSERT INTO usage_daily (agent_id, day, tenant_id, requests, completed,"
                " input_tokens, output_tokens)"
                " SELECT agent_id, (occurred_at AT TIME ZONE 'UTC')::date, tenant_id, count(*),"
                " count(*), sum(input_tokens), sum(output_tokens) FROM usage_events"
                " GROUP BY 1, 2, 3 ON CONFLICT DO NOTHING"
            )
            await conn.execute(
                "INSERT INTO usage_daily_by_agent (provider_agent_id, day, org_id, instances,"
                " requests, completed, input_tokens, output_tokens)"
                " SELECT $1, day, p.org_id, count(*), sum(requests), sum(completed),"
                " sum(input_tokens), sum(output_tokens) FROM usage_daily u"
                " JOIN provider_agents p ON p.provider_agent_id = $1 WHERE u.tenant_id = $2"
                " GROUP BY day, p.org_id ON CONFLICT DO NOTHING", provider_agent_id, org_id,
            )
            await conn.execute("ALTER TABLE usage_events ENABLE TRIGGER usage_events_daily")
        loaded_usage = time.monotonic() - started - loaded_configs
        # What the usage consumer will pay per event with the rollups kept by trigger.
        trigger_started = time.monotonic()
        await conn.execute(
            "INSERT INTO usage_events (event_id, tenant_id, agent_id, status, input_tokens,"
            " output_tokens, duration_ms, occurred_at)"
            " SELECT gen_random_uuid(), $1, b.agent_id, 'completed', 1, 1, 1, now()"
            " FROM generate_series(1, 10000) g JOIN busy b ON b.n = 1 + g % 1000", org_id,
        )
        trigger_s = time.monotonic() - trigger_started
        await conn.execute("ANALYZE")
        return {"configs_s": round(loaded_configs, 1), "usage_s": round(loaded_usage, 1),
                "usage_insert_with_rollups_per_s": round(10_000 / trigger_s)}
    finally:
        await conn.close()


async def time_list(http: httpx.AsyncClient, path: str, requests: int) -> dict[str, Any]:
    samples = []
    items = 0
    for _ in range(requests):
        started = time.perf_counter()
        response = await http.get(path)
        samples.append(time.perf_counter() - started)
        response.raise_for_status()
        items = len(response.json()["items"])
    return {**percentiles(samples), "items": items}


async def lists(cmp_url: str, token: str, database_url: str, org_id: str,
                requests: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        total = await conn.fetchval(
            "SELECT count(*) FROM customer_agent_configs WHERE tenant_id = $1", org_id)
        middle = await conn.fetchval(
            "SELECT agent_id FROM customer_agent_configs WHERE tenant_id = $1"
            " ORDER BY agent_id OFFSET $2 LIMIT 1", org_id, total // 2)
        near_end = await conn.fetchval(
            "SELECT agent_id FROM customer_agent_configs WHERE tenant_id = $1"
            " ORDER BY agent_id OFFSET $2 LIMIT 1", org_id, max(0, total - 101))
        usage_rows = await conn.fetchval("SELECT count(*) FROM usage_daily WHERE tenant_id = $1",
                                         org_id)
        deep_usage = await conn.fetchrow(
            "SELECT day, agent_id FROM usage_daily WHERE tenant_id = $1"
            " ORDER BY day DESC, agent_id DESC OFFSET $2 LIMIT 1", org_id, usage_rows // 2)
    finally:
        await conn.close()
    pages = {
        "customer_agent_configs": ("/api/customer-agent-configs?limit=100", [
            ("middle", encode_cursor([middle])), ("last", encode_cursor([near_end]))]),
        "usage_agent_instances": ("/api/usage/agent-instances?limit=100", [
            ("middle", encode_cursor([deep_usage["day"].isoformat(), deep_usage["agent_id"]]))]),
        "orders": ("/api/orders?limit=100", []),
        "agent_api_keys": ("/api/agent-api-keys?limit=100", []),
    }
    found: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=cmp_url, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        for name, spec in pages.items():
            path, deeper = spec
            progress(f"cmp: timing {path}")
            found[name] = {"first_page": await time_list(http, path, requests)}
            for label, cursor in deeper:
                found[name][f"{label}_page"] = await time_list(
                    http, f"{path}&cursor={cursor}", requests)
    return {"rows": {"customer_agent_configs": total, "usage_daily": usage_rows}, **found}


async def webhook_to_first_token(stack: Stack, provider_agent_id: str, orders: int
                                 ) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as gateway:
        for index in range(orders):
            buyer = await create_owner(stack.database_url, f"bench-{index}-{os.getpid()}@x.test",
                                       f"Bench buyer {index}", "customer")
            async with CmpClient(stack.cmp_url, buyer["cmp_token"]) as client:
                placed = await client.order(buyer["org_id"], provider_agent_id)
                started = time.perf_counter()
                approved = await approve_order(stack.cmp_url, stack.secrets.webhook_secret,
                                               placed["order_id"])
                webhook_done = time.perf_counter()
                await client.wait_active(approved["agent_id"], poll_s=0.01)
                active = time.perf_counter()
                key = await client.create_key(approved["agent_id"], "secret")
            async with gateway.stream(
                "POST", f"/v1/agents/{approved['agent_id']}/chat",
                json={"message": "hello"},
                headers={"authorization": f"Bearer {key['token']}",
                         "accept": "text/event-stream"},
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("event: token"):
                        break
                first_token = time.perf_counter()
            samples.append({"webhook_ms": (webhook_done - started) * 1000,
                            "provisioned_ms": (active - started) * 1000,
                            "first_token_ms": (first_token - started) * 1000})
    return {
        "orders": orders,
        "median_first_token_ms": round(statistics.median(s["first_token_ms"] for s in samples)),
        "median_provisioned_ms": round(statistics.median(s["provisioned_ms"] for s in samples)),
        "median_webhook_ms": round(statistics.median(s["webhook_ms"] for s in samples), 1),
        "runs": [{k: round(v, 1) for k, v in s.items()} for s in samples],
    }


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    seller = await create_owner(stack.database_url, "bench-seller@x.test", "Bench seller",
                                "provider")
    async with CmpClient(stack.cmp_url, seller["cmp_token"]) as client:
        agent = await client.publish_agent(seller["org_id"], "Bench agent",
                                           orjson.loads(DEMO_FLOW.read_bytes()))
    progress("cmp: first token after the webhook")
    journey = await webhook_to_first_token(stack, agent["provider_agent_id"], args.orders)
    buyer = await create_owner(stack.database_url, "bench-big-buyer@x.test", "Big buyer",
                               "customer")
    progress(f"cmp: loading {args.configs} agent configs and {args.usage} usage events")
    load_s = await bulk_load(stack.database_url, buyer["org_id"], agent["provider_agent_id"],
                             args.configs, args.usage)
    listed = await lists(stack.cmp_url, buyer["cmp_token"], stack.database_url,
                         buyer["org_id"], args.requests)
    async with httpx.AsyncClient(base_url=stack.cmp_url, timeout=30, headers={
            "Authorization": f"Bearer {seller['cmp_token']}"}) as http:
        listed["usage_provider_agents_of_seller"] = {"first_page": await time_list(
            http, "/api/usage/provider-agents?limit=100", args.requests)}
    return {"cmp_lists": listed, "cmp_bulk_load_s": load_s,
            "cmp_webhook_to_first_token": journey}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=100_000)
    parser.add_argument("--usage", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--orders", type=int, default=5)
    args = parser.parse_args()
    stdout = os.dup(1)
    os.dup2(2, 1)
    root = Path(tempfile.mkdtemp(prefix="sitekit-bench-cmp-"))
    root.chmod(0o755)  # Postgres runs as its own user under root and must reach its folder
    stack = Stack(StackSettings(root=root / "stack", ports=Ports.free(), gateway_workers=1,
                                llm_first_token_ms=20, llm_tokens_per_s=400,
                                postgres_dir=root / "pg"), progress)
    try:
        stack.start()
        found = asyncio.run(measure(stack, args))
        found["cmp_llm_first_token_ms"] = stack.settings.llm_first_token_ms
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    os.write(stdout, orjson.dumps(found, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
