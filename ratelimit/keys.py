"""Redis key names of the buckets: every key the limiter touches is built here.

Both buckets of a tenant carry the tenant id as the hash tag (`{...}`), so Redis Cluster puts them
in one slot and the two-key script never fails with CROSSSLOT.
See https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags
"""

from __future__ import annotations

PREFIX = "rl"


def _checked_tenant(tenant_id: str) -> str:
    # An empty tag ("{}") hashes the whole key name, which would split a tenant's buckets over
    # slots; a brace inside the id would end the tag early and let two tenants share names.
    if not tenant_id or "{" in tenant_id or "}" in tenant_id:
        raise ValueError(f"tenant id must be non-empty and without braces: {tenant_id!r}")
    return tenant_id


def tenant_bucket_key(tenant_id: str) -> str:
    return f"{PREFIX}:{{{_checked_tenant(tenant_id)}}}:t"


def check_key_id(key_id: str) -> str:
    if not key_id:
        raise ValueError("key id must be non-empty")
    return key_id


def key_bucket_key(tenant_id: str, key_id: str) -> str:
    return f"{PREFIX}:{{{_checked_tenant(tenant_id)}}}:k:{check_key_id(key_id)}"
