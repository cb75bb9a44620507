"""The Redis broker's consumer, and the heartbeat thread that keeps consumers alive.

A consumer takes up to ``prefetch`` messages per round trip into its own in-flight set,
and acks are buffered and flushed with the next fetch. An idle consumer blocks on a
per-queue wake-up list instead of polling, and wakes when the earliest delayed message
is due. See redis_scripts.py for what each call does in Redis.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import DecodeError
from ..message import Message
from . import redis_scripts as lua
from .base import Consumer, MessageProxy

if TYPE_CHECKING:
    from .redis import RedisBroker

logger = logging.getLogger("djqueue.broker.redis")

# Acks wait at most this long (s) for the next fetch before being flushed on their own.
ACK_FLUSH_DELAY = 0.005
# A nearly full consumer waits this long (s) for more acks, to refill in one round trip.
REFILL_DELAY = 0.002


def _unpack(sizes: bytes, blob: bytes) -> Iterator[tuple[bytes, bytes, int]]:
    """(tag, payload, delivery count) of each message of a fetch's reply."""
    numbers = [int(n) for n in sizes.split()]
    at = 0
    for i in range(0, len(numbers), 3):
        tag_end = at + numbers[i + 1]
        end = tag_end + numbers[i + 2]
        yield blob[at:tag_end], blob[tag_end:end], numbers[i]
        at = end


class Heartbeat(threading.Thread):
    """Beats for every open consumer of one broker, from its own thread so a long actor
    cannot starve it, and gives back the messages of consumers that stopped beating."""

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__(name="djqueue-redis-heartbeat", daemon=True)
        self.broker = broker
        self.stop = threading.Event()

    def run(self) -> None:
        streak = 0  # consecutive successful beats
        while True:
            try:
                # After an outage every process's heartbeats are stale: give back other
                # consumers' messages only once they all had a full interval to beat again.
                self.beat(recover=streak >= 1)
                if streak < 0:
                    logger.info("Redis heartbeats resumed")
                streak = max(streak, 0) + 1
            except Exception as e:
                if streak >= 0:
                    logger.warning(
                        "Redis heartbeat failed, retrying every %d ms: %s", self.broker.heartbeat_interval, e
                    )
                streak = -1
            if self.stop.wait(self.broker.heartbeat_interval / 1000):
                return

    def beat(self, *, recover: bool) -> None:
        broker = self.broker
        with broker.consumers_lock:
            consumers = dict(broker.consumers)
            # Only a consumer whose own fetch registered it before this beat can have been
            # dropped: a new one is registered by whichever of the two comes first.
            registered = {cid for cid, consumer in consumers.items() if consumer.registered}
            args: list[Any] = [broker.heartbeat_timeout if recover else 0]
            for cid, consumer in consumers.items():
                args += [cid, consumer.queue_name]
            missing, recovered = broker.run("heartbeat", args, retry=True)
        for cid in missing:
            if cid.decode() in registered:
                logger.warning(
                    "consumer of %r had no heartbeat for over %d ms; its messages went to other consumers",
                    consumers[cid.decode()].queue_name,
                    broker.heartbeat_timeout,
                )
        if recovered:
            logger.warning(
                "gave back %d message(s) of consumers with no heartbeat for %d ms",
                recovered,
                broker.heartbeat_timeout,
            )


class RedisConsumer(Consumer):
    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.timeout = timeout / 1000
        self.cid = uuid.uuid4().hex
        self.notify_key = f"{broker.prefix}q:{queue_name}:notify"
        self.registered = False  # set by the first fetch
        self.lock = threading.Lock()
        self.acked = threading.Condition(self.lock)
        self.buffer: deque[tuple[bytes, bytes, int]] = deque()  # fetched, not yet handed out
        self.outstanding: set[bytes] = set()  # fetched and not settled
        # The outstanding message delivered over lua.ISOLATE_AFTER times: while we hold
        # one, fetches skip other such messages (see redis_scripts.py).
        self.isolated: bytes | None = None
        self.pending: list[bytes] = []  # acked, to flush with the next fetch
        self.nacks: list[bytes] = []  # nacks that failed, sent again before the next fetch
        self.pending_since = 0.0
        self.opened_at: float | None = None  # when capacity opened since the last fetch
        self.refill = max(1, self.prefetch // 4)
        self.buffering = False  # True while the consumer thread will flush acks soon
        self.idle = False  # the last fetch found nothing to take
        self.next_due: float | None = None  # monotonic time the earliest delayed message is due
        self.closed = False

    # -- the consumer thread ----------------------------------------------------------

    def __next__(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout
        with self.lock:
            self.buffering = True
        try:
            while not self.closed:
                with self.lock:
                    fetch = self._should_fetch(time.monotonic())
                if fetch:
                    self._fetch()
                if self.buffer:
                    return self._proxy(self.buffer.popleft())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._wait(remaining)
            return None
        finally:
            with self.lock:
                self.buffering = False

    def _should_fetch(self, now: float) -> bool:
        # Under the lock. Acks ride along with fetches; they are sent on their own only
        # when no fetch comes within ACK_FLUSH_DELAY, or before blocking.
        if self.nacks or (self.pending and (self.idle or now - self.pending_since >= ACK_FLUSH_DELAY)):
            return True
        if self.buffer or self.idle:
            return False
        capacity = self.prefetch - len(self.outstanding)
        if capacity <= 0:
            return False
        # Refill in batches: a nearly full consumer waits a moment for more acks rather
        # than paying a round trip per message.
        return capacity >= self.refill or self.opened_at is None or now - self.opened_at >= REFILL_DELAY

    def _fetch(self) -> None:
        with self.lock:
            nacks, self.nacks = self.nacks, []
        for i, tag in enumerate(nacks):
            try:
                self._send_nack(tag)
            except Exception:
                with self.lock:
                    self.nacks[:0] = nacks[i:]
                raise
        with self.lock:
            acks, self.pending = self.pending, []
            count = max(0, self.prefetch - len(self.outstanding))
            isolated = "0" if self.isolated is None else "1"
            self.opened_at = None
        try:
            now, first_eta, sizes, blob = self.broker.run(
                "fetch", [self.queue_name, self.cid, count, isolated, *acks]
            )
        except Exception:
            with self.lock:
                self.pending[:0] = acks  # acks are idempotent: send them again later
            raise
        self.registered = True
        with self.lock:
            for item in _unpack(sizes, blob):
                self.outstanding.add(item[0])
                if item[2] > lua.ISOLATE_AFTER:
                    self.isolated = item[0]
                self.buffer.append(item)
            if count > 0:
                self.idle = not sizes
        self.next_due = time.monotonic() + (int(first_eta) - now) / 1000 if first_eta else None

    def _wait(self, remaining: float) -> None:
        now = time.monotonic()
        with self.lock:
            if self._should_fetch(now):
                return
            if not self.idle:
                until = remaining
                if self.pending:
                    until = min(until, self.pending_since + ACK_FLUSH_DELAY - now)
                if self.opened_at is not None and len(self.outstanding) < self.prefetch:
                    until = min(until, self.opened_at + REFILL_DELAY - now)
                if until > 0:
                    self.acked.wait(until)
                return
            # Nothing to take: block until an enqueue pushes a wake-up token, or the
            # earliest delayed message is due.
            wait = min(remaining, self.broker.max_block)
            if self.next_due is not None:
                wait = min(wait, self.next_due - now)
            if wait < 0.001:
                self.idle = False
                return
            self.buffering = False  # acks made while we block are sent at once
        try:
            self.broker.call(self.broker.client.blpop, [self.notify_key], timeout=wait)
        finally:
            with self.lock:
                self.buffering = True
                self.idle = False

    def _proxy(self, item: tuple[bytes, bytes, int]) -> MessageProxy:
        tag, data, count = item
        try:
            message = Message.decode(data)
        except DecodeError as e:
            return MessageProxy.malformed(data, e, self.queue_name, tag=tag, delivery_count=count)
        except Exception as e:  # a decoder bug must not stop the consumer either
            error = DecodeError(f"payload could not be decoded: {e!r}", data)
            return MessageProxy.malformed(data, error, self.queue_name, tag=tag, delivery_count=count)
        return MessageProxy(message, data=data, tag=tag, delivery_count=count)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            acks, self.pending = self.pending, []
            # A failed nack's message is given back: it fails again and is dead-lettered then.
            never_handed_out = [tag for tag, _, _ in self.buffer] + self.nacks
            self.nacks = []
            self.buffer.clear()
            self.outstanding.clear()
            self.isolated = None
        broker = self.broker
        with broker.consumers_lock:
            broker.consumers.pop(self.cid, None)
        broker.run("release", [self.queue_name, self.cid, len(acks), *acks, *never_handed_out], retry=True)

    # -- any thread -------------------------------------------------------------------

    def _settle(self, proxy: MessageProxy) -> bool:
        # Under the lock. False: already settled, requeued, or the consumer is closed.
        if proxy.tag not in self.outstanding:
            return False
        self.outstanding.discard(proxy.tag)
        if proxy.tag == self.isolated:
            self.isolated = None
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        self.acked.notify()
        return True

    def ack(self, proxy: MessageProxy) -> None:
        with self.lock:
            if not self._settle(proxy):
                return
            if self.buffering:
                if not self.pending:
                    self.pending_since = time.monotonic()
                self.pending.append(proxy.tag)
                return
        try:
            self.broker.run("ack", [self.queue_name, self.cid, proxy.tag], retry=True)
        except Exception:
            # Sent again with the next fetch (acks are idempotent); dropped, the message
            # would stay in flight, kept there by this consumer's heartbeats, until close.
            with self.lock:
                if not self.closed:
                    if not self.pending:
                        self.pending_since = time.monotonic()
                    self.pending.append(proxy.tag)
            raise

    def nack(self, proxy: MessageProxy) -> None:
        with self.lock:
            if not self._settle(proxy):
                return
        try:
            self._send_nack(proxy.tag)
        except Exception:
            with self.lock:
                if not self.closed:
                    self.nacks.append(proxy.tag)
            raise

    def _send_nack(self, tag: bytes) -> None:
        broker = self.broker
        broker.run("nack", [self.queue_name, self.cid, broker.dead_letter_ttl, tag], retry=True)

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        with self.lock:
            tags = [proxy.tag for proxy in proxies if self._settle(proxy)]
        if tags:
            self.broker.run("requeue", [self.queue_name, self.cid, *tags], retry=True)
