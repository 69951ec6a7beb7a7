"""Names shared on the wire between the CMP (which writes them) and the gateways (which read
them): Redis keys, pub/sub channels and key claims. One place, so both sides agree."""

from __future__ import annotations

AUDIENCE = "gateway"
ALGORITHM = "EdDSA"

REGISTRY_PREFIX = "sk:registry:"
REGISTRY_CHANNEL = "sk:registry:changed"
REVOKED_SET = "sk:keys:revoked"
REVOKED_CHANNEL = "sk:keys:revocations"
JWKS_CHANNEL = "sk:jwks:changed"

# Present while Redis holds everything the CMP published; gone after Redis lost its data.
SYNCED_MARKER = "sk:cmp:synced"

KEY_KINDS = ("secret", "publishable")


def registry_key(agent_id: str) -> str:
    return f"{REGISTRY_PREFIX}{agent_id}"


def collection_name(tenant_id: str, agent_id: str) -> str:
    return f"tenant_{tenant_id}_agent_{agent_id}"
