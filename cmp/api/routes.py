"""Every operation of the REST API, in the order the OpenAPI document lists them. A resource's
module adds its list here."""

from __future__ import annotations

from cmp.api import audit, identity, marketplace, provider_agents
from cmp.api.operation import Operation

OPERATIONS: list[Operation] = [
    *identity.OPERATIONS,
    *audit.OPERATIONS,
    *provider_agents.OPERATIONS,
    *marketplace.OPERATIONS,
]
