"""The marketplace signs each webhook like Stripe does: header
`SiteKit-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`. A signature older
than the tolerance is refused, so a captured delivery cannot be replayed later; within it, the
delivery id makes a replay a no-op."""

from __future__ import annotations

import hashlib
import hmac
import time

from starlette.requests import Request

from cmp.errors import Unauthenticated

HEADER = "sitekit-signature"
TOLERANCE_S = 300


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header value for `body`; the marketplace's side, and the tests'."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, body, t)}"


def verify_webhook(request: Request, body: bytes, secret: str, now: float | None = None) -> None:
    if not secret:
        raise Unauthenticated("webhooks are off: CMP_WEBHOOK_SECRET is not set")
    header = request.headers.get(HEADER, "")
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    timestamp, signature = parts.get("t", ""), parts.get("v1", "")
    if not timestamp.isdigit() or not signature:
        raise Unauthenticated(f"missing or malformed {HEADER} header (t=...,v1=...)")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > TOLERANCE_S:
        raise Unauthenticated(f"signature timestamp is {int(age)} s off (tolerance "
                              f"{TOLERANCE_S} s): a replay, or a clock to fix")
    if not hmac.compare_digest(_digest(secret, body, int(timestamp)), signature):
        raise Unauthenticated("the signature does not match the body")
