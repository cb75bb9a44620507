"""The consuming side of the RabbitMQ broker: one pika BlockingConnection per consumer."""

from __future__ import annotations

import collections
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
from .rabbitmq_publisher import RECOVERABLE, Broken

if TYPE_CHECKING:
    from .rabbitmq import RabbitmqBroker

logger = logging.getLogger("djqueue.broker.rabbitmq")

# A message that arrives this much (ms) before its eta had a delay longer than the delay
# levels hold: it goes round again.
REDELAY_THRESHOLD = 1000

generations = itertools.count(1)

_ACK, _NACK, _REQUEUE = "ack", "nack", "requeue"


def _noop() -> None:
    pass


class RabbitmqConsumer(Consumer):
    """Consumes one queue on its own pika connection, driven by the consumer thread.

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
        self.consumer_tag = ""
        self.generation = 0
        self.buffer: collections.deque[tuple[int, bool, Any, bytes]] = collections.deque()
        self.unsettled: set[int] = set()  # delivered on this connection, not settled yet
        self.ops: collections.deque[tuple[int, str, int]] = collections.deque()
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
            channel.basic_qos(prefetch_count=self.prefetch)
            channel.add_on_cancel_callback(self._on_cancel)
            generation = next(generations)
            self.buffer.clear()
            self.unsettled.clear()
            self.generation, self.cancelled = generation, False
            self.consumer_tag = channel.basic_consume(
                self.queue_name, lambda *args: self._on_message(generation, *args), auto_ack=False
            )
        except RECOVERABLE as e:
            self.generation = 0
            close_quietly(connection)
            if isinstance(e, pika.exceptions.ChannelClosedByBroker) and e.reply_code == 404:
                self.broker._redeclare(self.queue_name)
            raise ConnectionError(f"cannot consume {self.queue_name!r}: {e!r}") from None
        self.connection, self.channel = connection, channel
        self.backoff = 0.1

    def _on_message(self, generation: int, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if generation == self.generation:
            self.unsettled.add(method.delivery_tag)
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
        ops, unsettled, channel = self.ops, self.unsettled, self.channel
        while ops:
            generation, kind, tag = ops.popleft()
            if generation != self.generation or tag not in unsettled:
                continue  # delivered on a connection that is gone: RabbitMQ gave it back
            if kind is _ACK:
                acks.append(tag)
            else:
                unsettled.discard(tag)
                channel.basic_nack(tag, multiple=False, requeue=kind is _REQUEUE)
        if acks:
            self._ack(acks)

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
        self.unsettled -= done

    def _proxy(self, tag: int, redelivered: bool, properties: Any, body: bytes) -> MessageProxy | None:
        count = (properties.headers or {}).get("x-delivery-count")
        if self.broker.queue_type == "quorum" and isinstance(count, int):
            delivery_count = count + 1
        else:
            delivery_count = 2 if redelivered else 1
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
        self.unsettled.discard(tag)
        self.channel.basic_ack(tag)
        return True

    # -- any thread -----------------------------------------------------------------

    def _settle(self, kind: str, proxy: MessageProxy) -> None:
        generation, tag = proxy.tag
        self.ops.append((generation, kind, tag))
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
            self._apply_ops()
            channel.basic_cancel(self.consumer_tag)
        except RECOVERABLE:
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
