"""Every operation of the REST API, in the order the OpenAPI document lists them. A resource's
module adds its list here."""

from __future__ import annotations

from cmp.api import (
    agent_configs,
    agent_keys,
    audit,
    identity,
    marketplace,
    orders,
    provider_agents,
    usage,
)
from cmp.api.operation import Operation

OPERATIONS: list[Operation] = [
    *identity.OPERATIONS,
    *provider_agents.OPERATIONS,
    *marketplace.OPERATIONS,
    *orders.OPERATIONS,
    *agent_configs.OPERATIONS,
    *agent_keys.OPERATIONS,
    *usage.OPERATIONS,
    *audit.OPERATIONS,
]
