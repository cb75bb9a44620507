"""The consuming side of the RabbitMQ broker: a small AMQP 0-9-1 client per consumer.

pika's BlockingConnection runs an I/O loop, timers and a callback dispatch around every
delivery, and an ack from a worker thread has to wake the consumer's thread and flush
through that loop. This client reads frames from the socket itself (the deliveries of
djqueue's own messages are parsed by hand, anything else by pika's codec), and a worker
thread writes its ack straight to the socket, under a lock.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import ssl
import struct
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pika.frame
from pika import spec

from ..errors import BrokerError, ConnectionError, DecodeError
from ..message import Message, current_millis
from .base import Consumer, MessageProxy
from .rabbitmq_publisher import RECOVERABLE, AmqpClient, Broken, Pending
from .reconnecting import Reconnecting

if TYPE_CHECKING:
    from .rabbitmq import RabbitmqBroker

logger = logging.getLogger("djqueue.broker.rabbitmq")

# A message that arrives this much (ms) before its eta had a delay longer than the delay
# levels hold: it goes round again.
REDELAY_THRESHOLD = 1000

# Deliveries of a message that ended without an ack or nack (its process died, its
# connection dropped), carried by the copy the consumer sends round through q.RQ.
DELIVERIES_HEADER = "x-djqueue-deliveries"

generations = itertools.count(1)

_DELIVER = spec.Basic.Deliver.INDEX
_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_ACK_HEAD = struct.pack(">BHIHH", 1, 1, 13, 60, 80)  # basic.ack on channel 1; tag, bits follow
_UNPACK_FRAME = struct.Struct(">BHI").unpack_from
_UNPACK_METHOD = struct.Struct(">I").unpack_from
_UNPACK_TAG = struct.Struct(">QB").unpack_from
_UNPACK_SIZE_FLAGS = struct.Struct(">QH").unpack_from


def ack_frame(tag: int, multiple: bool = False) -> bytes:
    """basic.ack on channel 1, packed by hand: it is written once per message."""
    return _ACK_HEAD + struct.pack(">QB", tag, multiple) + b"\xce"


def redelivered_queue(queue_name: str) -> str:
    return f"{queue_name}.RQ"


class Delivery:
    """What RabbitMQ sent: tag, redelivered flag, priority, headers and body."""

    __slots__ = ("body", "headers", "priority", "redelivered", "size", "source", "tag")

    def __init__(self, tag: int, redelivered: bool, source: str) -> None:
        self.tag = tag
        self.redelivered = redelivered
        self.source = source
        self.priority = 0
        self.headers: dict[str, Any] | None = None
        self.size = 0
        self.body: Any = b""

    @property
    def earlier(self) -> int:
        """Deliveries before this one that ended unsettled, as the header says."""
        earlier = (self.headers or {}).get(DELIVERIES_HEADER, 0)
        return earlier if isinstance(earlier, int) and earlier > 0 else 0


class RabbitmqConsumer(AmqpClient, Consumer):
    """Consumes one queue on a connection of its own.

    The consumer thread reads; any thread acks, nacks or requeues by writing to the
    socket under ``lock``. A proxy's tag is (connection generation, delivery tag): once
    the connection is replaced, settling a message delivered on the old one does nothing
    (RabbitMQ already gave it back), and can never ack another message that has the same
    tag on the new channel.

    RabbitMQ marks a message it gives back after a crash only "redelivered" (quorum
    queues count, but count a requeue too), so the consumer keeps the count itself: a
    redelivered message is published again to ``q.RQ`` with its count in a header, then
    acked. The consumer takes ``q.RQ`` one message at a time (a prefetch of its own), so
    a message that keeps killing its process is held alone, and the messages fetched
    with it the first time do not go down with it again. A requeue publishes the message
    again with its count unchanged, so it does not count as a delivery.
    """

    heartbeat = 60  # seconds at most; RabbitMQ or the URL may ask for less

    def __init__(self, broker: RabbitmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(1, int(prefetch))
        self.timeout = timeout / 1000
        self.connection_name = f"djqueue consumer {queue_name} pid={os.getpid()} n={next(generations)}"
        self.sock: Any = None
        self.poller: Any = None
        self.frame_max = 131072
        self.lock = threading.Lock()  # writes to the socket, and ``unsettled``
        self.rx = bytearray()
        self.generation = 0
        self.sources: dict[str, str] = {}  # consumer tag -> the queue it consumes
        self.buffer: collections.deque[Delivery] = collections.deque()
        self.incoming: Delivery | None = None  # a delivery whose body is still arriving
        # Delivered on this connection, not settled yet: tag -> the queue it came from.
        self.unsettled: dict[int, str] = {}
        # Acks and rejects of worker threads, waiting for whichever of them holds ``lock``.
        self.settling: collections.deque[tuple[tuple[int, int], bytes | None]] = collections.deque()
        self.owner = threading.get_ident()  # the thread that runs __next__
        self.inside = False  # the owner is inside __next__
        self.cancelled = False
        self.closed = False
        self.awaiting: type | None = None  # the answer _expect waits for
        self.answer: Any = None
        self.consuming = queue_name  # the queue of the basic.consume awaiting its ok
        self.last_read = self.last_write = 0.0
        self.retry_at = 0.0
        # Reconnects in place (a new connection, the same consumer), with the log lines
        # and backoff of every broker (0.1 s doubling up to 10 s).
        self.reconnecting = Reconnecting(broker, queue_name, logger)
        try:
            self._start()
        except (ConnectionError, BrokerError) as e:
            self._failed(e)

    def holding(self) -> int:
        """Messages delivered to this consumer and not settled yet."""
        if threading.get_ident() == self.owner and not self.inside and self.sock is not None:
            # Between two next() on the owner's thread: take in what RabbitMQ already sent.
            try:
                self._read(0)
            except (Broken, *RECOVERABLE) as e:
                self._lost(e)
        return len(self.unsettled)

    # -- connecting -----------------------------------------------------------------

    def _start(self) -> None:
        try:
            self._connect(time.monotonic() + 30)
        except (Broken, *RECOVERABLE) as e:
            self._close_socket()
            if isinstance(e, Broken) and e.code == 404:
                self.broker._redeclare(self.queue_name)
            raise ConnectionError(str(e) or repr(e)) from None
        self.reconnecting.succeeded()

    def _failed(self, error: BrokerError) -> None:
        delay = self.reconnecting.failed(error, expected=isinstance(error, ConnectionError))
        self.retry_at = time.monotonic() + delay

    def _opened(self, sock: Any) -> None:
        self.rx = bytearray()
        self.incoming = None
        self.buffer.clear()
        self.last_read = self.last_write = time.monotonic()
        with self.lock:
            self.unsettled.clear()
            self.generation = 0

    def _setup_channel(self, deadline: float) -> None:
        self.cancelled = False
        self.sources = {}
        # A per-consumer prefetch: the main queue's, then one for q.RQ.
        for name, prefetch in ((self.queue_name, self.prefetch), (redelivered_queue(self.queue_name), 1)):
            self._send_method(1, spec.Basic.Qos(prefetch_count=prefetch))
            self._expect(spec.Basic.QosOk, deadline)
            self.consuming = name
            self._send_method(1, spec.Basic.Consume(queue=name))
            self._expect(spec.Basic.ConsumeOk, deadline)
        # Reads block in poll(); a socket timeout only bounds a write to a stuck peer.
        self.sock.settimeout(30)
        with self.lock:
            self.generation = next(generations)

    def _reconnect(self, deadline: float) -> bool:
        now = time.monotonic()
        if now < self.retry_at:
            pause = min(self.retry_at, deadline) - now
            if pause > 0:
                time.sleep(pause)
            if time.monotonic() < self.retry_at:
                return False
        failures = self.reconnecting.failures
        try:
            self._start()  # which logs the recovery after failed attempts
        except (ConnectionError, BrokerError) as e:
            self._failed(e)
            return time.monotonic() < deadline
        if not failures:
            logger.info("consuming %r again", self.queue_name)  # after a lost connection
        return True

    def _lost(self, error: BaseException) -> None:
        logger.warning(
            "lost the connection consuming %r (%s); its %d unacked message(s) go back to the queue",
            self.queue_name,
            error,
            len(self.unsettled),
        )
        with self.lock:
            self.generation = 0
            self.unsettled.clear()
            self._close_socket()
        self.buffer.clear()
        self.incoming = None
        self.retry_at = time.monotonic()

    # -- writing (any thread) -------------------------------------------------------

    def _write(self, data: bytes) -> None:
        # With ``lock`` held.
        sock = self.sock
        if sock is None:
            raise Broken("not connected")
        sock.sendall(data)
        self.last_write = time.monotonic()

    def _send_method(self, channel: int, method: Any) -> None:
        with self.lock:
            self._write(pika.frame.Method(channel, method).marshal())

    def _settle(self, key: tuple[int, int], frame: bytes | None) -> None:
        """Ack (``frame`` None) or send ``frame`` for the delivery ``key`` (generation,
        delivery tag): the one place a delivery is settled, so that a tag of a connection
        that is gone never settles the delivery of the same number on its successor."""
        # Threads that finish together share one write: the thread that gets the lock
        # writes every settlement queued by then, so the others find theirs sent. Fewer,
        # larger writes cost RabbitMQ fewer socket reads per message.
        self.settling.append((key, frame))
        with self.lock:
            settled: list[tuple[int, bytes | None]] = []
            while self.settling:
                (generation, tag), frame = self.settling.popleft()
                # Delivered on a connection that is gone: RabbitMQ gave it back already.
                if generation == self.generation and self.unsettled.pop(tag, None) is not None:
                    settled.append((tag, frame))
            if not settled:
                return
            last = max(tag for tag, _ in settled)
            if (
                len(settled) > 1
                and all(frame is None for _, frame in settled)
                and (not self.unsettled or min(self.unsettled) > last)
            ):
                # Nothing delivered up to ``last`` is left unsettled: one ack covers them all.
                data = ack_frame(last, multiple=True)
            else:
                data = b"".join(frame or ack_frame(tag) for tag, frame in settled)
            try:
                self._write(data)
            except (Broken, OSError, ssl.SSLError):
                # The consumer thread sees the connection fail; RabbitMQ redelivers.
                logger.warning("could not settle %d message(s): the connection is gone", len(settled))

    # -- reading (the consumer thread) ----------------------------------------------

    def __next__(self) -> MessageProxy | None:
        self.owner, self.inside = threading.get_ident(), True
        try:
            return self._next()
        finally:
            self.inside = False

    def _next(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout
        while not self.closed:
            if self.sock is None:
                if not self._reconnect(deadline):
                    return None
                continue
            try:
                while self.buffer:
                    proxy = self._proxy(self.buffer.popleft())
                    if proxy is not None:
                        return proxy
                if self.cancelled:
                    raise Broken("RabbitMQ cancelled the consumer (queue deleted, or its node down)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._read(min(remaining, self._beat()))
            except (Broken, *RECOVERABLE) as e:
                self._lost(e)
        return None

    def _beat(self) -> float:
        """Send a heartbeat when one is due; seconds until the next check."""
        if not self.heartbeat:
            return 3600.0
        now = time.monotonic()
        if now - self.last_read > 2 * self.heartbeat:
            raise Broken(f"no heartbeat from RabbitMQ for {now - self.last_read:.0f}s")
        if now - self.last_write >= self.heartbeat / 2:
            with self.lock:
                self._write(_HEARTBEAT_FRAME)
        return self.heartbeat / 2

    def _read(self, timeout: float) -> None:
        sock = self.sock
        buffered = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not buffered and not self.poller.poll(max(0, int(timeout * 1000 + 0.999))):
            return
        with self.lock:  # an SSL socket must not read while another thread writes
            try:
                data = sock.recv(262144)
            except (TimeoutError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return
        if not data:
            raise Broken("RabbitMQ closed the connection")
        self.last_read = time.monotonic()
        self.rx += data
        self._parse()

    def _parse(self) -> None:
        rx = self.rx
        size = len(rx)
        pos = 0
        while size - pos >= 8:
            kind, _, length = _UNPACK_FRAME(rx, pos)
            end = pos + 7 + length
            if end >= size:
                break
            if rx[end] != 0xCE:
                raise Broken("a malformed frame from RabbitMQ")
            start, pos = pos + 7, end + 1
            incoming = self.incoming
            if kind == 3 and incoming is not None:  # body
                incoming.body += rx[start:end]
                if len(incoming.body) >= incoming.size:
                    self._delivered(incoming)
            elif kind == 1:  # method
                if _UNPACK_METHOD(rx, start)[0] == _DELIVER:
                    self.incoming = self._deliver(rx, start + 4)
                else:
                    self._method(rx[start:end])
            elif kind == 2 and incoming is not None:  # content header
                self._header(incoming, rx, start, end)
            # Heartbeats need nothing: reading them set last_read.
        del rx[:pos]

    def _deliver(self, rx: bytearray, offset: int) -> Delivery:
        tag_length = rx[offset]
        consumer_tag = rx[offset + 1 : offset + 1 + tag_length].decode()
        tag, bits = _UNPACK_TAG(rx, offset + 1 + tag_length)
        return Delivery(tag, bool(bits & 1), self.sources.get(consumer_tag, self.queue_name))

    def _header(self, incoming: Delivery, rx: bytearray, start: int, end: int) -> None:
        incoming.size, flags = _UNPACK_SIZE_FLAGS(rx, start + 4)
        if flags == 0x1000:  # delivery mode only: what djqueue publishes
            pass
        elif flags == 0x1800:  # and a priority
            incoming.priority = rx[start + 15]
        else:
            properties = spec.BasicProperties()
            properties.decode(bytes(rx[start + 12 : end]))
            incoming.priority = properties.priority or 0
            incoming.headers = properties.headers
        if incoming.size == 0:
            self._delivered(incoming)

    def _delivered(self, delivery: Delivery) -> None:
        self.incoming = None
        delivery.body = bytes(delivery.body)
        with self.lock:
            self.unsettled[delivery.tag] = delivery.source
        self.buffer.append(delivery)

    def _method(self, payload: bytes | bytearray) -> None:
        method = spec.methods[_UNPACK_METHOD(payload)[0]]()
        method.decode(payload, 4)
        self._handle_method(method)

    def _handle_method(self, method: Any) -> None:
        if self.awaiting is not None and isinstance(method, self.awaiting):
            self.answer = method
            if isinstance(method, spec.Basic.ConsumeOk):
                # Known at once: deliveries may follow in the same read.
                self.sources[method.consumer_tag] = self.consuming
        elif isinstance(method, spec.Basic.Cancel):
            self.cancelled = True
        elif isinstance(method, spec.Connection.Close):
            self._try_send(0, spec.Connection.CloseOk())
            raise Broken(
                f"RabbitMQ closed the connection: {method.reply_code} {method.reply_text}", method.reply_code
            )
        elif isinstance(method, spec.Channel.Close):
            self._try_send(1, spec.Channel.CloseOk())
            raise Broken(
                f"RabbitMQ closed the channel: {method.reply_code} {method.reply_text}", method.reply_code
            )

    def _try_send(self, channel: int, method: Any) -> None:
        try:
            self._send_method(channel, method)
        except (Broken, OSError):
            pass

    def _expect(self, kind: Any, deadline: float) -> Any:
        """Read until RabbitMQ answers with ``kind``; deliveries meanwhile are kept."""
        self.awaiting, self.answer = kind, None
        try:
            while self.answer is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Broken(f"RabbitMQ did not answer with {kind.NAME} in time")
                self._read(remaining)
            return self.answer
        finally:
            self.awaiting = None

    # -- turning deliveries into messages -------------------------------------------

    def _proxy(self, delivery: Delivery) -> MessageProxy | None:
        delivery_count = delivery.earlier + 1
        proxy_tag = (self.generation, delivery.tag)
        body = delivery.body
        try:
            if delivery.redelivered:
                # Its last delivery ended unsettled (a process died, a connection dropped).
                delivery_count += 1
                if self._count_again(delivery, delivery_count - 1):
                    return None
            message = Message.decode(body)
            eta = message.eta
            early = isinstance(eta, int | float) and eta - current_millis() > REDELAY_THRESHOLD
            if early and self._redelay(message, delivery):
                return None
        except DecodeError as e:
            error = e
        except Exception as e:
            # Raised out of next(), it would make the worker replace this consumer: the
            # message would come back, for ever, and each new connection would drop the
            # acks of the messages running meanwhile. Dead-lettered, with the reason.
            logger.exception("could not handle a message delivered from %r", delivery.source)
            error = DecodeError(f"the consumer could not handle it: {type(e).__name__}: {e}", body)
        else:
            return MessageProxy(message, data=body, tag=proxy_tag, delivery_count=delivery_count)
        return MessageProxy.malformed(
            body, error, self.queue_name, tag=proxy_tag, delivery_count=delivery_count
        )

    def _count_again(self, delivery: Delivery, deliveries: int) -> bool:
        entry = self._entry(redelivered_queue(self.queue_name), delivery.body, delivery.priority, deliveries)
        try:
            self._publish([entry])
        except (BrokerError, ValueError, TypeError) as e:
            # Run it now, counted in memory only: better than holding up the queue.
            logger.warning("could not send a redelivered message round (%s); running it", e)
            return False
        self._settle((self.generation, delivery.tag), None)
        return True

    def _redelay(self, message: Message, delivery: Delivery) -> bool:
        # Only a delay longer than MAX_DELAY arrives early: send it round again.
        try:
            entry = self.broker._pending(self.queue_name, delivery.body, message.priority, message.eta)
            self._publish([entry])
        except (BrokerError, ValueError, TypeError) as e:
            logger.warning("could not delay %s again (%s); running it early", message.message_id, e)
            return False
        self._settle((self.generation, delivery.tag), None)
        return True

    def _entry(self, routing_key: str, body: bytes, priority: int, deliveries: int) -> Pending:
        priority = min(max(int(priority), 0), self.broker.max_priority)
        headers = {DELIVERIES_HEADER: deliveries} if deliveries > 0 else None
        return Pending(self.queue_name, b"", routing_key.encode(), body, priority, headers)

    def _publish(self, entries: list[Pending]) -> None:
        publisher = self.broker._publisher()
        with publisher.lock:
            publisher.publish(entries, 1)  # confirmed before the original is acked

    def _return(self, items: list[tuple[tuple[int, int], str, bytes, int, int]]) -> None:
        """Give ((generation, tag), source queue, body, priority, earlier deliveries) back uncounted:
        published again with the count they had, then acked. A basic.reject with requeue
        would bring them back "redelivered", counted."""
        if not items:
            return
        entries = [self._entry(source, body, priority, n) for _, source, body, priority, n in items]
        try:
            self._publish(entries)
        except (BrokerError, ValueError, TypeError) as e:
            logger.warning("could not give %d message(s) back uncounted (%s): requeueing", len(entries), e)
            for (generation, tag), *_ in items:
                reject = pika.frame.Method(1, spec.Basic.Reject(tag, requeue=True)).marshal()
                self._settle((generation, tag), reject)
            return
        for key, *_ in items:
            self._settle(key, None)

    # -- the contract's verbs (any thread) ------------------------------------------

    def ack(self, proxy: MessageProxy) -> None:
        self._flush_or_give_back([proxy])  # what the job enqueued is confirmed before its ack
        self._settle(proxy.tag, None)

    def nack(self, proxy: MessageProxy) -> None:
        self._flush_or_give_back([proxy])
        reject = pika.frame.Method(1, spec.Basic.Reject(proxy.tag[1], requeue=False)).marshal()
        self._settle(proxy.tag, reject)  # RabbitMQ dead-letters it into q.DQ

    def _flush_or_give_back(self, proxies: list[MessageProxy]) -> None:
        """Wait until RabbitMQ confirmed what this thread sent (a job's retries and
        follow-ups); if it cannot be confirmed, give the deliveries back and raise."""
        try:
            self.broker._flush_thread()
        except Exception:
            # Acking could lose what the job sent; holding the delivery on this live
            # connection would keep it from everyone (RabbitMQ redelivers only when the
            # connection closes) and take a prefetch slot for good. Run it again instead.
            for proxy in proxies:
                generation, tag = proxy.tag
                reject = pika.frame.Method(1, spec.Basic.Reject(tag, requeue=True)).marshal()
                self._settle((generation, tag), reject)
            raise

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        given = list(proxies)
        self._flush_or_give_back(given)
        items = []
        with self.lock:
            for proxy in given:
                generation, tag = proxy.tag
                source = self.unsettled.get(tag) if generation == self.generation else None
                if source is None:
                    continue  # its connection is gone: RabbitMQ gave it back
                message = proxy.message if proxy.decode_error is None else None
                priority = (
                    message.priority if message is not None and isinstance(message.priority, int) else 0
                )
                items.append((proxy.tag, source, proxy.data or b"", priority, proxy.delivery_count - 1))
        try:
            self._return(items)
        except (Broken, *RECOVERABLE) as e:
            logger.warning("could not give %d message(s) back (%s): RabbitMQ will", len(items), e)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.broker._consumers_lock:
            self.broker._consumers.discard(self)
        if self.sock is None:
            return
        try:
            # Stop the deliveries; those still on their way are kept until the cancel-ok.
            # Then what arrived and was never handed out goes back uncounted; what was
            # handed out and not settled goes back counted when the connection closes,
            # as if this process had died.
            deadline = time.monotonic() + 5
            for consumer_tag in list(self.sources):
                self._send_method(1, spec.Basic.Cancel(consumer_tag))
                self._expect(spec.Basic.CancelOk, deadline)
            unread = [
                ((self.generation, d.tag), d.source, d.body, d.priority, d.earlier)
                for d in self.buffer
                if not d.redelivered and d.tag in self.unsettled
            ]
            self.buffer.clear()
            self._return(unread)
            self._send_method(
                0, spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
            )
            self._expect(spec.Connection.CloseOk, time.monotonic() + 1)
        except (Broken, BrokerError, *RECOVERABLE):
            pass
        finally:
            with self.lock:
                self.generation = 0
                self.unsettled.clear()
                self._close_socket()
            self.buffer.clear()


def close_quietly(connection: Any) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:
        pass
