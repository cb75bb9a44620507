"""The consuming side of the RabbitMQ broker: one pika BlockingConnection per consumer."""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from ..errors import BrokerError, ConnectionError, DecodeError
from ..message import Message, current_millis
from .base import Consumer, MessageProxy
from .rabbitmq_publisher import RECOVERABLE, Broken, Pending

if TYPE_CHECKING:
    from .rabbitmq import RabbitmqBroker

logger = logging.getLogger("djqueue.broker.rabbitmq")

# A message that arrives this much (ms) before its eta had a delay longer than the delay
# levels hold: it goes round again.
REDELAY_THRESHOLD = 1000

generations = itertools.count(1)

_ACK, _NACK, _REQUEUE = "ack", "nack", "requeue"

# Deliveries of a message that ended without an ack or nack (its process died, its
# connection dropped), carried by the copy the consumer sends round through q.RQ.
DELIVERIES_HEADER = "x-djqueue-deliveries"


def redelivered_queue(queue_name: str) -> str:
    return f"{queue_name}.RQ"


def _noop() -> None:
    pass


class RabbitmqConsumer(Consumer):
    """Consumes one queue on its own pika connection, driven by the consumer thread.

    RabbitMQ marks a message it gives back after a crash only "redelivered" (quorum
    queues count, but count a requeue too), so the consumer keeps the count itself: a
    redelivered message is published again to ``q.RQ`` with its count in a header, then
    acked. The consumer takes ``q.RQ`` one message at a time (a prefetch of its own), so
    a message that keeps killing its process is held alone, and the messages fetched
    with it the first time do not go down with it again. A requeue publishes the message
    again with its count unchanged, so it does not count as a delivery.

    Worker threads settle messages by appending to ``ops``; the consumer thread applies
    them, woken from ``process_data_events`` by ``add_callback_threadsafe``. A proxy's
    tag is (connection generation, delivery tag): once the connection is replaced,
    settling a message delivered on the old one does nothing (RabbitMQ already gave it
    back), and can never ack another message that has the same tag on the new channel.
    """

    def __init__(self, broker: RabbitmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(1, int(prefetch))
        self.ack_batch = max(1, self.prefetch // 4)
        self.timeout = timeout / 1000
        self.connection_name = f"djqueue consumer {queue_name} pid={os.getpid()} n={next(generations)}"
        self.connection: Any = None
        self.channel: Any = None
        self.consumer_tags: list[str] = []
        self.generation = 0
        self.buffer: collections.deque[tuple[int, bool, Any, bytes]] = collections.deque()
        # Delivered on this connection, not settled yet: tag -> the queue it came from.
        self.unsettled: dict[int, str] = {}
        self.ops: collections.deque[tuple[int, str, int, MessageProxy]] = collections.deque()
        self.owner = threading.get_ident()  # the thread that runs __next__
        self.inside = False  # the owner is inside __next__
        self.waiting = False
        self.woken = False
        self.cancelled = False
        self.closed = False
        self.retry_at = 0.0
        self.backoff = 0.1
        try:
            self._connect()
        except (ConnectionError, BrokerError) as e:
            logger.warning("the consumer of %r will connect later: %s", queue_name, e)

    def holding(self) -> int:
        """Messages delivered to this consumer and not settled yet."""
        if threading.get_ident() == self.owner and not self.inside and self.connection is not None:
            # Between two next() on the owner's thread: take in what RabbitMQ already sent.
            try:
                self.connection.process_data_events(0)
            except RECOVERABLE as e:
                self._lost(e)
        return len(self.unsettled)

    def _connect(self) -> None:
        connection = self.broker._blocking_connection(self.connection_name)
        try:
            channel = connection.channel()
            channel.add_on_cancel_callback(self._on_cancel)
            generation = next(generations)
            self.buffer.clear()
            self.unsettled.clear()
            self.generation, self.cancelled = generation, False
            self.consumer_tags = []
            # A per-consumer prefetch: the main queue's, then one for q.RQ.
            for name, prefetch in ((self.queue_name, self.prefetch), (redelivered_queue(self.queue_name), 1)):
                channel.basic_qos(prefetch_count=prefetch)
                callback = functools.partial(self._on_message, generation, name)
                self.consumer_tags.append(channel.basic_consume(name, callback, auto_ack=False))
        except RECOVERABLE as e:
            self.generation = 0
            close_quietly(connection)
            if isinstance(e, pika.exceptions.ChannelClosedByBroker) and e.reply_code == 404:
                self.broker._redeclare(self.queue_name)
            raise ConnectionError(f"cannot consume {self.queue_name!r}: {e!r}") from None
        self.connection, self.channel = connection, channel
        self.backoff = 0.1

    def _on_message(
        self, generation: int, source: str, channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        if generation == self.generation:
            self.unsettled[method.delivery_tag] = source
            self.buffer.append((method.delivery_tag, method.redelivered, properties, body))

    def _on_cancel(self, frame: Any) -> None:
        self.cancelled = True

    def __next__(self) -> MessageProxy | None:
        self.owner, self.inside = threading.get_ident(), True
        try:
            return self._next()
        finally:
            self.inside = False

    def _next(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout
        while not self.closed:
            if self.connection is None:
                if not self._reconnect(deadline):
                    return None
                continue
            try:
                self._apply_ops()
                while self.buffer:
                    proxy = self._proxy(*self.buffer.popleft())
                    if proxy is not None:
                        return proxy
                if self.cancelled:
                    raise Broken("RabbitMQ cancelled the consumer (queue deleted, or its node down)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.woken = False
                self.waiting = True
                try:
                    if not self.ops:
                        self.connection.process_data_events(time_limit=remaining)
                finally:
                    self.waiting = False
            except (Broken, *RECOVERABLE) as e:
                self._lost(e)
        return None

    def _reconnect(self, deadline: float) -> bool:
        now = time.monotonic()
        if now < self.retry_at:
            pause = min(self.retry_at, deadline) - now
            if pause > 0:
                time.sleep(pause)
            if time.monotonic() < self.retry_at:
                return False
        try:
            self._connect()
        except (ConnectionError, BrokerError) as e:
            logger.warning("cannot consume %r yet, retrying in %.1fs: %s", self.queue_name, self.backoff, e)
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, 10.0)
            return time.monotonic() < deadline
        logger.info("consuming %r again", self.queue_name)
        return True

    def _lost(self, error: BaseException) -> None:
        logger.warning(
            "lost the connection consuming %r (%r); its %d unacked message(s) go back to the queue",
            self.queue_name,
            error,
            len(self.unsettled),
        )
        connection = self.connection
        self.connection = self.channel = None
        self.generation = 0
        self.buffer.clear()
        self.unsettled.clear()
        self.retry_at = time.monotonic()
        close_quietly(connection)

    def _apply_ops(self) -> None:
        acks = []
        requeues: list[tuple[int, MessageProxy]] = []
        ops, unsettled, channel = self.ops, self.unsettled, self.channel
        while ops:
            generation, kind, tag, proxy = ops.popleft()
            if generation != self.generation or tag not in unsettled:
                continue  # delivered on a connection that is gone: RabbitMQ gave it back
            if kind is _ACK:
                acks.append(tag)
            elif kind is _REQUEUE:
                requeues.append((tag, proxy))
            else:
                del unsettled[tag]
                channel.basic_nack(tag, multiple=False, requeue=False)
        if requeues:
            self._give_back(requeues)
        if acks:
            self._ack(acks)

    def _give_back(self, requeues: list[tuple[int, MessageProxy]]) -> None:
        items = []
        for tag, proxy in requeues:
            message = proxy.message if proxy.decode_error is None else None
            priority = message.priority if message is not None and isinstance(message.priority, int) else 0
            items.append((tag, proxy.data or b"", priority, proxy.delivery_count - 1))
        self._return(items)

    def _return(self, items: list[tuple[int, bytes, Any, int]]) -> None:
        """Give (tag, body, priority, earlier deliveries) back to the queues they came
        from, uncounted: published again with the count they had, then acked. A
        basic.nack with requeue would bring them back "redelivered", counted."""
        if not items:
            return
        entries = [self._entry(self.unsettled[t], body, priority or 0, n) for t, body, priority, n in items]
        try:
            self._publish(entries)
        except (BrokerError, ValueError, TypeError) as e:
            logger.warning("could not give %d message(s) back uncounted (%s): requeueing", len(entries), e)
            for tag, *_ in items:
                del self.unsettled[tag]
                self.channel.basic_nack(tag, multiple=False, requeue=True)
            return
        for tag, *_ in items:
            del self.unsettled[tag]
            self.channel.basic_ack(tag)

    def _entry(self, routing_key: str, body: bytes, priority: int, deliveries: int) -> Pending:
        priority = min(max(int(priority), 0), self.broker.max_priority)
        headers = {DELIVERIES_HEADER: deliveries} if deliveries > 0 else None
        return Pending(self.queue_name, b"", routing_key.encode(), body, priority, headers)

    def _publish(self, entries: list[Pending]) -> None:
        publisher = self.broker._publisher()
        with publisher.lock:
            publisher.publish(entries, 1)  # confirmed before the original is acked

    def _ack(self, acks: list[int]) -> None:
        done = set(acks)
        open_tags = [tag for tag in self.unsettled if tag not in done]
        lowest_open = min(open_tags) if open_tags else None
        # One multiple ack covers every tag below the first unfinished one, never beyond.
        prefix = [tag for tag in done if lowest_open is None or tag < lowest_open]
        if len(prefix) > 1:
            self.channel.basic_ack(max(prefix), multiple=True)
        elif prefix:
            self.channel.basic_ack(prefix[0])
        for tag in sorted(done.difference(prefix)):
            self.channel.basic_ack(tag)
        for tag in done:
            del self.unsettled[tag]

    def _proxy(self, tag: int, redelivered: bool, properties: Any, body: bytes) -> MessageProxy | None:
        delivery_count = self._earlier(properties) + 1
        if redelivered:
            # Its last delivery ended unsettled (a process died, a connection dropped).
            delivery_count += 1
            if self._count_again(tag, properties, body, delivery_count - 1):
                return None
        proxy_tag = (self.generation, tag)
        try:
            message = Message.decode(body)
        except DecodeError as e:
            return MessageProxy.malformed(
                body, e, self.queue_name, tag=proxy_tag, delivery_count=delivery_count
            )
        eta = message.eta
        early = isinstance(eta, int | float) and eta - current_millis() > REDELAY_THRESHOLD
        if early and self._redelay(message, body, tag):
            return None
        return MessageProxy(message, data=body, tag=proxy_tag, delivery_count=delivery_count)

    @staticmethod
    def _earlier(properties: Any) -> int:
        earlier = (properties.headers or {}).get(DELIVERIES_HEADER, 0)
        return earlier if isinstance(earlier, int) and earlier > 0 else 0

    def _count_again(self, tag: int, properties: Any, body: bytes, deliveries: int) -> bool:
        entry = self._entry(redelivered_queue(self.queue_name), body, properties.priority or 0, deliveries)
        try:
            self._publish([entry])
        except (BrokerError, ValueError, TypeError) as e:
            # Run it now, counted in memory only: better than holding up the queue.
            logger.warning("could not send a redelivered message round (%s); running it", e)
            return False
        del self.unsettled[tag]
        self.channel.basic_ack(tag)
        return True

    def _redelay(self, message: Message, body: bytes, tag: int) -> bool:
        # Only a delay longer than MAX_DELAY arrives early: send it round again.
        try:
            entry = self.broker._pending(self.queue_name, body, message.priority, message.eta)
            publisher = self.broker._publisher()
            with publisher.lock:
                publisher.publish([entry], 1)
        except (BrokerError, ValueError, TypeError) as e:
            logger.warning("could not delay %s again (%s); running it early", message.message_id, e)
            return False
        del self.unsettled[tag]
        self.channel.basic_ack(tag)
        return True

    # -- any thread -----------------------------------------------------------------

    def _settle(self, kind: str, proxy: MessageProxy) -> None:
        generation, tag = proxy.tag
        self.ops.append((generation, kind, tag, proxy))
        if threading.get_ident() == self.owner and not self.inside:
            # The consumer's own thread, between two next(): apply at once.
            if self.connection is not None:
                try:
                    self._apply_ops()
                except RECOVERABLE as e:
                    self._lost(e)
        elif self.waiting and not self.woken and (kind is not _ACK or self._ack_batch_ready()):
            self.woken = True
            connection = self.connection
            if connection is not None:
                try:
                    connection.add_callback_threadsafe(_noop)
                except Exception:
                    pass  # closed: the consumer thread notices by itself

    def _ack_batch_ready(self) -> bool:
        # Waking the consumer thread costs more than the ack: gather a few, but never
        # keep back the acks of everything it holds (nothing else would wake it).
        pending = len(self.ops)
        return pending >= self.ack_batch or pending >= len(self.unsettled)

    def ack(self, proxy: MessageProxy) -> None:
        self.broker._flush_thread()
        self._settle(_ACK, proxy)

    def nack(self, proxy: MessageProxy) -> None:
        self.broker._flush_thread()
        self._settle(_NACK, proxy)

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        self.broker._flush_thread()
        for proxy in proxies:
            self._settle(_REQUEUE, proxy)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.broker._consumers_lock:
            self.broker._consumers.discard(self)
        connection, channel = self.connection, self.channel
        if connection is None:
            return
        try:
            # Stop RabbitMQ sending more: a channel-wide prefetch no higher than what we
            # hold (frames arrive in order, so all it sent before is here once the
            # qos-ok is), then take that in. Cancelling would give back, counted, what
            # was still on its way. Then settle: what was given back or never handed out
            # returns uncounted; what was handed out and not settled returns counted
            # when the connection closes, as if this process had died.
            channel.basic_qos(prefetch_count=max(1, len(self.unsettled)), global_qos=True)
            connection.process_data_events(0)
            for consumer_tag in self.consumer_tags:
                channel.basic_cancel(consumer_tag)
            self._apply_ops()
            unread = [
                (tag, body, properties.priority, self._earlier(properties))
                for tag, redelivered, properties, body in self.buffer
                if not redelivered and tag in self.unsettled
            ]
            self.buffer.clear()
            self._return(unread)
        except (BrokerError, *RECOVERABLE):
            pass
        finally:
            self.connection = self.channel = None
            self.generation = 0
            self.buffer.clear()
            self.unsettled.clear()
            close_quietly(connection)


def close_quietly(connection: Any) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:
        pass
