"""The limiter's own Redis connection: the URL's login, database, Unix socket and TLS, and what
it does with a reply it cannot read.

Each test runs a Redis of its own, configured as the URL it tests needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack import services
from devstack.procs import ManagedProcess, free_port, tcp_ready
from ratelimit import BucketLimiter, LimiterUnavailable
from ratelimit.keys import tenant_bucket_key
from ratelimit.pipe import PipeClosed, RedisPipe
from tests.ratelimit.conftest import WIDE

PASSWORD = "s3cret pass"  # a space, to be quoted in the URL


def own_redis(tmp_path: Path, *extra: str, port: int | None = None) -> ManagedProcess:
    port = port or free_port()
    plain = services.redis(port, tmp_path)
    return dataclasses.replace(plain, argv=[*plain.argv, *extra])


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Redis that wants a password, on TCP and on a Unix socket."""
    port, sock = free_port(), tmp_path / "redis.sock"
    process = own_redis(
        tmp_path,
        "--requirepass",
        PASSWORD,
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        port=port,
    )
    process.start()
    try:
        process.wait_ready(30)
        yield port, sock
    finally:
        process.stop()


async def bucket_in(url: str, tenant: str) -> bool:
    client = aioredis.Redis.from_url(url)
    try:
        return bool(await client.exists(tenant_bucket_key(tenant)))
    finally:
        await client.aclose()


async def test_the_url_password_and_database_are_used(locked_redis: tuple[int, Path]) -> None:
    port, _ = locked_redis
    url = f"redis://:s3cret%20pass@127.0.0.1:{port}/3"
    limiter = BucketLimiter.from_url(url)
    try:
        assert (await limiter.check("acme", "key0", WIDE, WIDE)).allowed
    finally:
        await limiter.aclose()
    assert await bucket_in(url, "acme")
    assert not await bucket_in(f"redis://:s3cret%20pass@127.0.0.1:{port}/0", "acme")


async def test_a_unix_socket_url(locked_redis: tuple[int, Path]) -> None:
    port, sock = locked_redis
    limiter = BucketLimiter.from_url(f"unix://{sock}?db=2&password=s3cret%20pass")
    try:
        assert (await limiter.check("beta", "key0", WIDE, WIDE)).allowed
    finally:
        await limiter.aclose()
    assert await bucket_in(f"redis://:s3cret%20pass@127.0.0.1:{port}/2", "beta")


async def test_a_wrong_password_fails_the_checks_and_says_so(
    locked_redis: tuple[int, Path],
) -> None:
    port, _ = locked_redis
    limiter = BucketLimiter.from_url(f"redis://:wrong@127.0.0.1:{port}/0")
    try:
        with pytest.raises(LimiterUnavailable, match="(?i)password"):
            await limiter.check("acme", "key0", WIDE, WIDE)
        with pytest.raises(LimiterUnavailable, match="(?i)password"):
            await limiter.load_script()
        assert limiter.undecided == 0
    finally:
        await limiter.aclose()


def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site kit test redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "redis.crt", tmp_path / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_a_tls_url_checks_the_certificate_and_can_present_one(tmp_path: Path) -> None:
    """The server's certificate must chain to the URL's CA; a server that wants a client's
    certificate gets the URL's."""
    cert, key = certificate(tmp_path)
    port = free_port()
    plain = own_redis(
        tmp_path, "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file",
        str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "yes",
    )  # fmt: skip
    argv = list(plain.argv)
    argv[argv.index("--port") + 1] = "0"  # TLS only
    process = dataclasses.replace(plain, argv=argv, ready=tcp_ready(port))
    process.start()
    base = f"rediss://127.0.0.1:{port}/0"
    limiters = {
        "presenting": BucketLimiter.from_url(
            f"{base}?ssl_ca_certs={cert}&ssl_certfile={cert}&ssl_keyfile={key}"),
        "anonymous": BucketLimiter.from_url(f"{base}?ssl_ca_certs={cert}", timeout=2.0),
        "untrusting": BucketLimiter.from_url(f"{base}?ssl_certfile={cert}&ssl_keyfile={key}"),
    }
    try:
        process.wait_ready(30)
        assert (await limiters["presenting"].check("acme", "key0", WIDE, WIDE)).allowed
        with pytest.raises(LimiterUnavailable):
            await limiters["anonymous"].check("acme", "key0", WIDE, WIDE)
        with pytest.raises(LimiterUnavailable, match="(?i)certificate verify failed"):
            await limiters["untrusting"].check("acme", "key0", WIDE, WIDE)
    finally:
        for limiter in limiters.values():
            await limiter.aclose()
        process.stop()


def test_a_bad_redis_url_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match="ssl_cert_reqs .* not 'sometimes'"):
        BucketLimiter.from_url("rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes")
    with pytest.raises(ValueError, match="scheme"):
        BucketLimiter.from_url("http://127.0.0.1:6379/0")


async def test_a_reply_to_no_call_closes_the_connection() -> None:
    """Bytes that answer nothing (or are not RESP) mean the connection cannot be trusted: it
    closes, and every call waiting on it gets PipeClosed."""
    for garbage in (b"+OK\r\n+OK\r\n", b"not resp\r\n"):
        pipe, transport = RedisPipe(), _Transport()
        pipe.connection_made(transport)
        first = pipe.request([b"PING"])
        pipe.data_received(garbage)
        assert transport.aborted and pipe.closed
        if garbage.startswith(b"+OK"):
            assert first.result() == [b"OK"]
        else:
            with pytest.raises(PipeClosed, match="could not be read"):
                first.result()
        late = pipe.request([b"PING"])
        with pytest.raises(PipeClosed, match="closed"):
            late.result()


async def test_a_call_answered_in_order_and_one_closed_by_its_callback() -> None:
    """Replies go to calls in the order they were made, however they are split into reads;
    a callback that closes the pipe leaves the replies after it unread."""
    pipe, transport = RedisPipe(), _Transport()
    pipe.connection_made(transport)
    first = pipe.request([b"PING", b"PING"])
    answered: list[object] = []

    def close_on_reply(replies: object) -> None:
        answered.append(replies)
        pipe.close("the caller was done")

    pipe.call(b"GET", 1, close_on_reply)
    third: list[object] = []
    pipe.call(b"PING", 1, third.append)
    pipe.data_received(b"+a\r\n+")
    assert not first.done()
    pipe.data_received(b"b\r\n$1\r\nc\r\n+d\r\n")
    assert first.result() == [b"a", b"b"]
    assert answered == [[b"c"]]
    assert len(third) == 1 and isinstance(third[0], PipeClosed)  # once, and not with "d"
    assert "the caller was done" in str(third[0])


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True
