"""The Kafka end of the usage sender: sends one round, one batch per partition, and says whether
Kafka acknowledged all of it.

A producer is trusted only while its connections to the broker hold. Once one breaks, the round
in flight fails at once (the sender resends it from the spool) and the next round starts a new
producer, which asks the broker for the topic again before it sends anything. A producer kept
across the break would send on what it learned from the broker before: aiokafka resends the
round in flight by itself as soon as the broker is back, and takes the next rounds' partitions
from its cache. Against a broker that lost the topic, that loses acknowledged events: Tansu's
memory engine forgets its topics when it restarts, acknowledges writes into a topic it does not
know, and when the topic is created afterwards (by devstack, once the port is open) its offsets
start at 0 again under those writes; a batch later acknowledged inside their offsets is never
served to a consumer. A new producer's metadata request creates the topic (or finds it) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.conn import CloseReason
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import murmur2

from gateway.spool import Record

log = logging.getLogger("sitekit.gateway.usage")

# The CloudEvents Kafka binding marks structured mode with this content-type header.
HEADERS = [("content-type", b"application/cloudevents+json; charset=utf-8")]


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str
    topic: str
    client_id: str
    send_timeout: float
    connect_timeout: float
    enable_idempotence: bool


class KafkaLink:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: Any = None
        self._lost = asyncio.Event()  # the current producer lost a connection to the broker
        self._hashes: dict[bytes, int] = {}
        self.connected = False

    async def deliver(self, records: list[Record]) -> bool:
        """Send one round; True once Kafka acknowledged all of it."""
        kafka = self._settings
        try:
            async with asyncio.timeout(kafka.connect_timeout + 2 * kafka.send_timeout):
                if self._lost.is_set():  # what it knows may describe a broker that is gone
                    await self.discard()
                producer = await self._producer_ready()
                partitions = sorted(await producer.partitions_for(kafka.topic))
                await self._send(producer, partitions, records)
        except Exception as exc:  # KafkaError, OSError, TimeoutError, or a surprise
            if self.connected:
                log.warning("usage: Kafka delivery failed (%r); spooling", exc)
            self.connected = False
            return False
        if not self.connected:
            log.info("usage: delivering to Kafka")
        self.connected = True
        return True

    async def _send(self, producer: Any, partitions: list[int], records: list[Record]) -> None:
        topic = self._settings.topic
        batches: dict[int, Any] = {}
        futures = []
        for key, value in records:
            partition = partitions[self._key_hash(key) % len(partitions)]
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=HEADERS) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=HEADERS)
        for partition, batch in batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        acknowledged: asyncio.Future[Any] = asyncio.gather(*futures)
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait((acknowledged, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not acknowledged.done():  # discard() fails what the producer still holds
                acknowledged.add_done_callback(_retrieve)
        if not acknowledged.done():
            raise KafkaConnectionError("lost the connection to Kafka with a round in flight")
        acknowledged.result()

    def _key_hash(self, key: bytes) -> int:
        """Kafka's default partitioner (murmur2), memoised: it costs ~14 µs in pure Python."""
        found = self._hashes.get(key)
        if found is None:
            if len(self._hashes) >= 100_000:
                self._hashes.clear()
            found = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return found

    async def _producer_ready(self) -> Any:
        if self._producer is None:
            kafka = self._settings
            producer = AIOKafkaProducer(
                bootstrap_servers=kafka.bootstrap_servers, client_id=kafka.client_id,
                acks="all", enable_idempotence=kafka.enable_idempotence,
                linger_ms=0,  # rounds are already batched by the flush interval
                max_batch_size=512 * 1024, request_timeout_ms=int(kafka.send_timeout * 1000),
            )
            self._watch_connections(producer)
            try:
                async with asyncio.timeout(kafka.connect_timeout):
                    await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
        return self._producer

    def _watch_connections(self, producer: Any) -> None:
        """Set `_lost` when a connection of this producer to the broker closes other than on
        purpose. The bootstrap connection, which only learns the broker's address, is closed on
        purpose (no reason); the topic's metadata comes over the broker connection that the
        batches then take, so a reconnection is always preceded by this signal."""
        client, lost = producer.client, asyncio.Event()
        self._lost = lost
        on_closed = client._on_connection_closed  # aiokafka hands it to every connection

        def closed(conn: Any, reason: CloseReason | None) -> None:
            if reason is not None and reason != CloseReason.SHUTDOWN:
                lost.set()
            on_closed(conn, reason)

        client._on_connection_closed = closed

    async def discard(self) -> None:
        producer, self._producer = self._producer, None
        self._lost = asyncio.Event()
        if producer is None:
            return
        # Fail whatever it still holds: those records are resent from the spool, and a stale
        # copy retried after the resend would break the per-partition order.
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None:
            accumulator.fail_all(KafkaConnectionError("usage producer discarded"))
        try:
            async with asyncio.timeout(self._settings.send_timeout):
                await producer.stop()
        except Exception as exc:
            log.debug("usage: stopping a discarded producer: %r", exc)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark the outcome of an abandoned round as seen (no 'exception never retrieved')."""
    if not future.cancelled():
        future.exception()
