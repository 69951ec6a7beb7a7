"""Key verification against a JWKS served by the test, which counts its fetches: forged kids
cannot make the gateway fetch the JWKS more than once per refetch interval, the cache of
verified keys keeps its size, and a cached key is refused once it expires."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cmp import wire
from cmp.signing import SigningKey, _public_jwk
from gateway.errors import InvalidKey
from gateway.keys import Jwks, KeyVerifier
from tests.gateway.raw_server import RawServer, ServeRaw, keep_alive_server

ISSUER = "sitekit-cmp"


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey("k_live", Ed25519PrivateKey.generate())


@pytest.fixture
async def jwks_server(serve: ServeRaw, signer: SigningKey) -> RawServer:
    """The CMP's JWKS, with the one key `signer` signs with."""
    keyset = {"keys": [_public_jwk(signer.kid, signer.private_key)]}
    return await keep_alive_server(serve, orjson.dumps(keyset))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


MakeVerifier = Callable[..., KeyVerifier]


@pytest.fixture
def make_verifier(jwks_server: RawServer, http: httpx.AsyncClient) -> MakeVerifier:
    def make(*, refetch_interval: float = 3600, cache_size: int = 100) -> KeyVerifier:
        jwks = Jwks(jwks_server.url("/.well-known/jwks.json"), http, refetch_interval)
        return KeyVerifier(jwks, issuer=ISSUER, cache_size=cache_size)
    return make


def claims(**override: Any) -> dict[str, Any]:
    return {"iss": ISSUER, "aud": wire.AUDIENCE, "jti": str(uuid.uuid4()),
            "tid": str(uuid.uuid4()), "aid": str(uuid.uuid4()), "kty": "secret",
            "iat": int(time.time()), **override}


def forged(count: int) -> list[str]:
    """Tokens signed by keys the JWKS does not have, each under a kid of its own."""
    key = Ed25519PrivateKey.generate()
    return [SigningKey(f"k_forged_{i}", key).sign(claims()) for i in range(count)]


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token whose signature is checked, in order."""
    checked: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        checked.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return checked


async def refused(verifier: KeyVerifier, token: str) -> str:
    with pytest.raises(InvalidKey) as caught:
        await verifier.verify(token)
    return caught.value.message


async def test_a_flood_of_unknown_kids_fetches_the_jwks_once(
    make_verifier: MakeVerifier, jwks_server: RawServer, signer: SigningKey
) -> None:
    verifier = make_verifier()
    tokens = forged(400)
    messages = await asyncio.gather(*(refused(verifier, token) for token in tokens[:200]))
    messages += [await refused(verifier, token) for token in tokens[200:]]
    assert set(messages) == {"the API key was signed by an unknown key"}
    assert len(jwks_server.requests) == 1
    assert jwks_server.requests[0].startswith(b"GET /.well-known/jwks.json ")
    # The one fetch loaded the real keys: a good key still verifies, without another fetch.
    assert (await verifier.verify(signer.sign(claims()))).kid == signer.kid
    assert len(jwks_server.requests) == 1


async def test_an_unknown_kid_fetches_the_jwks_again_once_the_interval_is_over(
    make_verifier: MakeVerifier, jwks_server: RawServer
) -> None:
    interval = 0.3
    verifier = make_verifier(refetch_interval=interval)
    first, second, third = forged(3)
    await refused(verifier, first)
    await refused(verifier, second)
    assert len(jwks_server.requests) == 1
    await asyncio.sleep(interval * 1.5)
    await refused(verifier, third)
    assert len(jwks_server.requests) == 2


async def test_the_cache_of_verified_keys_keeps_the_newest_up_to_its_size(
    make_verifier: MakeVerifier, signer: SigningKey, signature_checks: list[str]
) -> None:
    verifier = make_verifier(cache_size=3)
    tokens = [signer.sign(claims()) for _ in range(10)]
    for token in tokens:
        await verifier.verify(token)
    assert signature_checks == tokens
    for token in tokens[-3:]:  # still cached
        await verifier.verify(token)
    assert signature_checks == tokens
    for token in tokens[:7]:  # dropped: verified again, each pushing an older one out
        await verifier.verify(token)
    assert signature_checks == tokens + tokens[:7]
    await verifier.verify(tokens[6])
    await verifier.verify(tokens[9])
    assert signature_checks == tokens + tokens[:7] + [tokens[9]]


async def test_a_cached_key_is_refused_once_it_expires(
    make_verifier: MakeVerifier, signer: SigningKey, signature_checks: list[str]
) -> None:
    verifier = make_verifier()
    expires_at = int(time.time()) + 2
    token = signer.sign(claims(exp=expires_at))
    assert (await verifier.verify(token)).expires_at == expires_at
    await verifier.verify(token)
    assert signature_checks == [token]
    await asyncio.sleep(expires_at - time.time() + 0.05)
    assert "expired" in await refused(verifier, token)
    assert signature_checks == [token]  # refused from the cache
    assert "expired" in await refused(verifier, token)  # and no longer cached
    assert signature_checks == [token, token]
