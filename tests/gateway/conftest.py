"""Fixtures of the gateway's unit tests: scripted raw servers and an upstream pool."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.upstream import UpstreamPool, UpstreamSettings
from tests.gateway.raw_server import WAIT, Handler, RawServer, ServeRaw


@pytest.fixture
async def serve() -> AsyncIterator[ServeRaw]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(UpstreamSettings(
        connect_timeout_s=WAIT, first_byte_timeout_s=WAIT, read_timeout_s=WAIT))
    yield pool
    await pool.aclose()
