"""A Redis Cluster of three primaries on loopback, for the tests and benches of what runs on one.

Each shard is a `redis-server` of the embedded stack with cluster mode on; the slots are split
in three ranges as `redis-cli --cluster create` would. `move_slot` migrates a slot the way an
operator's resharding does (IMPORTING, MIGRATING, MIGRATE of its keys, SETSLOT NODE), and can
stop half-way, as a resharding in progress is seen by clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from devstack import services
from devstack.procs import ManagedProcess, free_port

RANGES = ((0, 5460), (5461, 10922), (10923, 16383))
AGREE_TIMEOUT_S = 20.0


@dataclass
class Shard:
    process: ManagedProcess
    port: int
    bus_port: int
    client: aioredis.Redis
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def command(self, *args: Any) -> Any:
        return await self.client.execute_command(*args)  # type: ignore[no-untyped-call]


class ThreeShards:
    def __init__(self, root: Path) -> None:
        self.shards: list[Shard] = []
        for index in range(3):
            port, bus_port = free_port(), free_port()
            plain = services.redis(port, root / f"shard{index}")
            process = dataclasses.replace(
                plain,
                name=f"redis-shard-{index}",
                argv=[
                    *plain.argv,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(root / f"shard{index}" / "nodes.conf"),
                    # The bus defaults to port + 10000, which a free port above 55535 cannot have.
                    "--cluster-port", str(bus_port),
                    "--cluster-node-timeout", "2000",
                ],
            )  # fmt: skip
            client = aioredis.Redis(port=port, decode_responses=True)
            self.shards.append(Shard(process, port, bus_port, client))

    @property
    def url(self) -> str:
        """The node clients are given: any node of a cluster leads to the others."""
        return self.shards[0].url

    async def start(self) -> None:
        for shard in self.shards:
            shard.process.start()
        for shard in self.shards:
            shard.process.wait_ready(30)
            shard.node_id = await shard.command("CLUSTER", "MYID")
        for shard, (first, last) in zip(self.shards, RANGES, strict=True):
            await shard.command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for shard in self.shards[1:]:
            await self.shards[0].command("CLUSTER", "MEET", "127.0.0.1", shard.port, shard.bus_port)
        await self.wait_agreed()

    async def stop(self) -> None:
        for shard in self.shards:
            await shard.client.aclose()
            shard.process.stop()

    async def wait_agreed(self) -> None:
        """Until every node reports the cluster ok and the same slot map (at most 20 s)."""
        async with asyncio.timeout(AGREE_TIMEOUT_S):
            while True:
                infos = [await shard.command("CLUSTER", "INFO") for shard in self.shards]
                maps = [await self._slot_map(shard) for shard in self.shards]
                if all("cluster_state:ok" in info for info in infos) and all(
                    m == maps[0] for m in maps
                ):
                    return
                await asyncio.sleep(0.05)

    async def _slot_map(self, shard: Shard) -> list[tuple[int, int, int]]:
        return sorted(
            (int(start), int(end), int(primary[1]))
            for start, end, primary, *_ in await shard.command("CLUSTER", "SLOTS")
        )

    def owner_of(self, slot: int, slot_map: list[tuple[int, int, int]]) -> Shard:
        port = next(port for start, end, port in slot_map if start <= slot <= end)
        return next(shard for shard in self.shards if shard.port == port)

    async def owner(self, slot: int) -> Shard:
        return self.owner_of(slot, await self._slot_map(self.shards[0]))

    async def reset(self) -> None:
        """Empty every shard and put any moved slot back where `start` put it."""
        for shard in self.shards:
            await shard.command("FLUSHALL")
        current = await self._slot_map(self.shards[0])
        for shard, (first, last) in zip(self.shards, RANGES, strict=True):
            for start, end, port in current:
                if port == shard.port:
                    continue
                for slot in range(max(start, first), min(end, last) + 1):
                    await self.move_slot(slot, shard)
        await self.wait_agreed()

    async def move_slot(
        self, slot: int, target: Shard, *, keys: bool = True, finish: bool = True
    ) -> None:
        """Migrate `slot` to `target`: mark it, move its keys (unless not `keys`), then hand
        the slot over (unless not `finish`, which leaves the migration in progress)."""
        source = await self.owner(slot)
        if source is target:
            return
        await target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        await source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        if keys:
            await self.move_keys(slot, source, target)
        if finish:
            for shard in (target, source, *(s for s in self.shards if s not in (source, target))):
                await shard.command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            await self.wait_agreed()

    async def move_keys(self, slot: int, source: Shard, target: Shard) -> None:
        while names := await source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await source.command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *names
            )
