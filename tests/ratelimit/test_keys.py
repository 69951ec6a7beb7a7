"""Key names: one hash tag per tenant, so both buckets of a check live in one cluster slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from ratelimit.keys import key_bucket_key, tenant_bucket_key


def test_names_carry_the_tenant_as_hash_tag() -> None:
    assert tenant_bucket_key("acme") == "rl:{acme}:t"
    assert key_bucket_key("acme", "k-1") == "rl:{acme}:k:k-1"


@pytest.mark.parametrize("tenant", ["acme", "0190a4c2-7d1e-7c3a-9f00-1b2c3d4e5f60", "ünï"])
def test_buckets_of_a_tenant_share_a_slot(tenant: str) -> None:
    slot = key_slot(tenant_bucket_key(tenant).encode())
    for key in ("a", "k:with:colons", "x" * 200, "{not-a-tag}"):
        assert key_slot(key_bucket_key(tenant, key).encode()) == slot
    assert key_slot(tenant.encode()) == slot


@pytest.mark.parametrize("tenant", ["", "a}b", "a{b", "}"])
def test_tenant_ids_that_would_break_the_tag_are_refused(tenant: str) -> None:
    with pytest.raises(ValueError):
        tenant_bucket_key(tenant)
    with pytest.raises(ValueError):
        key_bucket_key(tenant, "k")


def test_empty_key_id_is_refused() -> None:
    with pytest.raises(ValueError):
        key_bucket_key("acme", "")
