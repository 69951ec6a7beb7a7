"""Provisioning a buyer's agent: deploy its flow version to the runtime, record where it runs,
write the registry entry. It runs from the `outbox` table, so an approved order is never lost:
a runtime outage only delays it, with bounded retries and backoff, and a CMP restart picks the
job up again. Several CMP processes share the work (`FOR UPDATE SKIP LOCKED` plus a lease)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from typing import Any

import asyncpg
import orjson

from cmp.agent_configs import load_config, publish_config
from cmp.config import CmpConfig
from cmp.errors import CmpError
from cmp.redis_clients import AnyRedis
from runtime.client import RuntimeClient, RuntimeClientError, RuntimeRequestError

log = logging.getLogger("sitekit.cmp.provisioning")

PROVISION = "provision"
# A claimed job is someone's for this long; a CMP that dies mid-job leaves it to another.
_LEASE_S = 120


def flow_id_for(provider_agent_id: uuid.UUID, version: int) -> str:
    """Instances of the same agent version share one deployed flow; tenants differ by the
    variables (collection) the gateway passes per request."""
    return f"pa-{provider_agent_id}-v{version}"


async def queue_provisioning(conn: asyncpg.Connection, agent_id: uuid.UUID) -> None:
    await conn.execute(
        "INSERT INTO outbox (kind, subject_id) VALUES ($1, $2)", PROVISION, agent_id
    )


class Provisioner:
    def __init__(
        self, config: CmpConfig, pool: asyncpg.Pool, redis: AnyRedis, *,
        poll_s: float = 0.5,
    ) -> None:
        self._config = config
        self._pool = pool
        self._redis = redis
        self._poll_s = poll_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                while await self.run_due() > 0:
                    pass
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("provisioning paused: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()

    async def run_due(self, limit: int = 10) -> int:
        """Run the jobs due now; return how many ran."""
        async with self._pool.acquire() as conn:
            jobs = await conn.fetch(
                "UPDATE outbox SET next_attempt_at = now() + make_interval(secs => $2)"
                " WHERE job_id IN (SELECT job_id FROM outbox WHERE done_at IS NULL"
                "  AND next_attempt_at <= now() ORDER BY job_id LIMIT $1 FOR UPDATE SKIP LOCKED)"
                " RETURNING job_id, kind, subject_id, attempts",
                limit, float(_LEASE_S),
            )
        for job in jobs:
            await self._run(job)
        return len(jobs)

    async def _run(self, job: asyncpg.Record) -> None:
        try:
            await self._provision(job["subject_id"])
        except (RuntimeClientError, CmpError, OSError) as exc:
            await self._failed(job, exc)
        else:
            async with self._pool.acquire() as conn:
                await conn.execute(
                    "UPDATE outbox SET done_at = now(), attempts = attempts + 1,"
                    " last_error = NULL WHERE job_id = $1", job["job_id"],
                )

    async def _provision(self, agent_id: uuid.UUID) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                "UPDATE customer_agent_configs SET provisioning = 'provisioning',"
                " updated_at = now() WHERE agent_id = $1 AND provisioning <> 'active'", agent_id,
            )
            version = await conn.fetchrow(
                "SELECT c.provider_agent_id, c.flow_version, v.flow"
                " FROM customer_agent_configs c JOIN provider_agent_versions v"
                " ON v.provider_agent_id = c.provider_agent_id AND v.version = c.flow_version"
                " WHERE c.agent_id = $1", agent_id,
            )
        if version is None:
            raise CmpError(f"agent config {agent_id} has no flow version to deploy")
        flow_id = flow_id_for(version["provider_agent_id"], version["flow_version"])
        flow: dict[str, Any] = orjson.loads(version["flow"])
        async with RuntimeClient(self._config.runtime_url, self._config.runtime_token) as runtime:
            await runtime.deploy(flow_id, version["flow_version"], flow)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE customer_agent_configs SET provisioning = 'active', failure_reason = NULL,"
                " runtime_url = $2, flow_id = $3, updated_at = now() WHERE agent_id = $1",
                agent_id, self._config.runtime_url, flow_id,
            )
            config = await load_config(conn, agent_id, None)
            await publish_config(conn, self._redis, config)
            await conn.execute(
                "INSERT INTO audit_log (org_id, action, object_type, object_id, details)"
                " VALUES ($1, 'agent_config.provisioned', 'agent_config', $2, $3)",
                config.row["tenant_id"], str(agent_id),
                orjson.dumps({"flow_id": flow_id, "runtime_url": self._config.runtime_url})
                .decode(),
            )

    async def _failed(self, job: asyncpg.Record, exc: Exception) -> None:
        attempts = job["attempts"] + 1
        reason = str(exc) or type(exc).__name__
        # A flow the runtime refuses will not deploy by waiting; anything else may.
        final = attempts >= self._config.provision_attempts or (
            isinstance(exc, RuntimeRequestError) and exc.status in (400, 401, 403, 422)
        )
        delay = min(self._config.provision_max_backoff_s,
                    self._config.provision_backoff_s * 2 ** (attempts - 1))
        delay *= random.uniform(0.8, 1.2)
        log.warning("provisioning %s failed (attempt %d): %s", job["subject_id"], attempts, reason)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE outbox SET attempts = $2, last_error = $3,"
                " next_attempt_at = now() + make_interval(secs => $4),"
                " done_at = CASE WHEN $5 THEN now() END WHERE job_id = $1",
                job["job_id"], attempts, reason, delay, final,
            )
            await conn.execute(
                "UPDATE customer_agent_configs SET failure_reason = $2, updated_at = now(),"
                " provisioning = CASE WHEN $3 THEN 'failed' ELSE 'provisioning' END"
                " WHERE agent_id = $1",
                job["subject_id"], f"attempt {attempts}: {reason}", final,
            )
