"""API key verification: EdDSA JWTs checked locally against the CMP's JWKS.

A verified key is cached by its exact token, so the signature is checked once per key, not
once per request; expiry and revocation are still checked on every request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from jwt.exceptions import PyJWTError

from cmp import wire
from gateway.errors import InvalidKey, Unavailable

_REQUIRED_CLAIMS = ["iss", "aud", "jti", "tid", "aid", "kty", "iat"]


@dataclass(frozen=True, slots=True)
class KeyClaims:
    key_id: str
    tenant_id: str
    agent_id: str
    kind: str
    origins: frozenset[str]
    expires_at: float | None
    kid: str


class Jwks:
    """The CMP's public keys by kid, fetched at start, periodically, and on an unknown kid (at
    most once per `refetch_interval` so forged kids cannot hammer the CMP)."""

    def __init__(self, url: str, client: httpx.AsyncClient, refetch_interval: float) -> None:
        self._url = url
        self._client = client
        self._refetch_interval = refetch_interval
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.loaded = False

    def get(self, kid: str) -> Any | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the JWKS unless fetched too recently; True if it was fetched."""
        async with self._lock:
            if not force and time.monotonic() - self._fetched_at < self._refetch_interval:
                return False
            self._fetched_at = time.monotonic()
            try:
                response = await self._client.get(self._url)
                response.raise_for_status()
                keyset = jwt.PyJWKSet.from_dict(response.json())
            except (httpx.HTTPError, PyJWTError, ValueError) as exc:
                raise Unavailable(f"cannot fetch the signing keys: {exc}") from exc
            self._keys = {
                k.key_id: k.key
                for k in keyset.keys
                if k.key_id and k.algorithm_name == wire.ALGORITHM
            }
            self.loaded = True
            return True


class KeyVerifier:
    def __init__(self, jwks: Jwks, *, issuer: str, cache_size: int) -> None:
        self._jwks = jwks
        self._issuer = issuer
        self._cache_size = cache_size
        self._cache: dict[str, KeyClaims] = {}

    async def verify(self, token: str) -> KeyClaims:
        claims = self._cache.get(token)
        if claims is not None:
            if claims.expires_at is not None and claims.expires_at <= time.time():
                del self._cache[token]
                raise InvalidKey("the API key has expired")
            return claims
        claims = await self._verify_signature(token)
        if len(self._cache) >= self._cache_size:
            # Dicts keep insertion order: dropping the oldest entry bounds memory cheaply.
            del self._cache[next(iter(self._cache))]
        self._cache[token] = claims
        return claims

    def forget_kids_except(self, kids: Iterable[str]) -> None:
        """Drop cached keys signed by keys no longer in the JWKS (a retired signing key)."""
        live = set(kids)
        for token, claims in list(self._cache.items()):
            if claims.kid not in live:
                del self._cache[token]

    async def _verify_signature(self, token: str) -> KeyClaims:
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise InvalidKey("the API key is malformed") from None
        if header.get("alg") != wire.ALGORITHM:
            raise InvalidKey(f"the API key's algorithm {header.get('alg')!r} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidKey("the API key names no signing key")
        public_key = self._jwks.get(kid)
        if public_key is None and await self._jwks.refresh():
            public_key = self._jwks.get(kid)
        if public_key is None:
            raise InvalidKey("the API key was signed by an unknown key")
        try:
            payload = jwt.decode(
                token,
                key=public_key,
                algorithms=[wire.ALGORITHM],
                audience=wire.AUDIENCE,
                issuer=self._issuer,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidKey("the API key has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidKey("the API key is not meant for this gateway") from None
        except jwt.InvalidIssuerError:
            raise InvalidKey("the API key was not issued by this platform") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidKey(f"the API key lacks the {exc.claim!r} claim") from None
        except PyJWTError:
            raise InvalidKey("the API key's signature does not verify") from None
        return _claims(payload, kid)


def _claims(payload: dict[str, Any], kid: str) -> KeyClaims:
    kind = payload["kty"]
    origins = payload.get("origins", [])
    if kind not in wire.KEY_KINDS:
        raise InvalidKey(f"the API key's type {kind!r} is unknown")
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise InvalidKey("the API key's origins are malformed")
    if kind == "publishable" and not origins:
        raise InvalidKey("the publishable key lists no origin")
    for name in ("jti", "tid", "aid"):
        if not isinstance(payload[name], str):
            raise InvalidKey(f"the API key's {name!r} claim is malformed")
    exp = payload.get("exp")
    return KeyClaims(
        key_id=payload["jti"],
        tenant_id=payload["tid"],
        agent_id=payload["aid"],
        kind=kind,
        origins=frozenset(origins),
        expires_at=float(exp) if exp is not None else None,
        kid=kid,
    )
