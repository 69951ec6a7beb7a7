"""Fixtures of the API tests: a copy of the demo flow to change, and a database connection."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cmp.config import CmpConfig
from tests.cmp.api.sellers import DEMO_FLOW


@pytest.fixture
def demo_flow() -> dict[str, Any]:
    return copy.deepcopy(DEMO_FLOW)


@pytest.fixture
async def db(cmp_config: CmpConfig) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cmp_config.database_url)
    yield conn
    await conn.close()
