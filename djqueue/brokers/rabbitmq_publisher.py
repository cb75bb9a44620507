"""The publishing side of the RabbitMQ broker: a small AMQP 0-9-1 client on pika's codec.

pika's BlockingConnection spends about 70 µs of Python per publish and waits a round
trip (and RabbitMQ's fsync) for each publisher confirm. This client writes the frames of
a publish itself, in one ``sendall``, and reads confirms as they come: a publish returns
once it is on the wire, while the message stays in memory until RabbitMQ confirms it and
is published again on a new connection if the old one fails. Each thread has its own
client (see ``RabbitmqBroker._publisher``); pika's parser and method classes do the rest.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions
import pika.frame
from pika import spec

from ..errors import BrokerError, ConnectionError, DecodeError
from ..message import Message
from .base import MessageProxy, _guess_message_id

if TYPE_CHECKING:
    from .rabbitmq import RabbitmqBroker

logger = logging.getLogger("djqueue.broker.rabbitmq")

RECOVERABLE = (pika.exceptions.AMQPError, OSError)
MAX_UNCONFIRMED_BYTES = 32 * 1024 * 1024  # per thread, whatever max_unconfirmed says
FATAL_CODES = (403, 530)  # wrong credentials, unknown vhost: retrying does not help
# Channel closes a message may cause, sent alone each time, before it is dropped: one that
# RabbitMQ always refuses (a body over its max_message_size) would otherwise go first on
# every new connection and block its thread's publishing for good.
MAX_REFUSALS = 3


class Pending:
    """A message to publish, kept until RabbitMQ confirms it."""

    __slots__ = ("body", "exchange", "headers", "priority", "queue_name", "returns", "routing_key", "sent_at")

    def __init__(
        self,
        queue_name: str,
        exchange: bytes,
        routing_key: bytes,
        body: bytes,
        priority: int,
        headers: dict[str, Any] | None = None,
    ) -> None:
        self.queue_name = queue_name
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.priority = priority
        self.headers = headers
        self.sent_at = 0.0
        self.returns = 0  # how often RabbitMQ returned it as unroutable


class Broken(Exception):
    """The publishing connection cannot be used any more. ``channel``: RabbitMQ closed
    the channel, which it does for an error in the last method it read."""

    def __init__(self, text: str, code: int = 0, channel: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.channel = channel


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, 1, len(payload)) + payload + b"\xce"


def publish_frames(
    exchange: bytes,
    routing_key: bytes,
    body: bytes,
    priority: int,
    frame_max: int,
    headers: dict[str, Any] | None = None,
) -> bytes:
    """The AMQP frames of one persistent, mandatory basic.publish on channel 1.

    Written by hand because it is the hot path: pika's marshalling costs more than the
    rest of an enqueue. tests/brokers/test_rabbitmq.py checks the bytes against pika's.
    Only a message sent round again carries ``headers``; pika encodes those.
    """
    method = (
        struct.pack(">HHHB", 60, 40, 0, len(exchange))
        + exchange
        + struct.pack(">B", len(routing_key))
        + routing_key
        + b"\x01"  # mandatory: an unroutable message comes back instead of vanishing
    )
    if headers:
        properties = spec.BasicProperties(delivery_mode=2, priority=priority or None, headers=headers)
        header_frame = pika.frame.Header(1, len(body), properties).marshal()
    elif priority:
        header_frame = _frame(2, struct.pack(">HHQHBB", 60, 0, len(body), 0x1800, 2, priority))
    else:
        header_frame = _frame(2, struct.pack(">HHQHB", 60, 0, len(body), 0x1000, 2))
    parts = [_frame(1, method), header_frame]
    step = frame_max - 8
    parts += [_frame(3, body[i : i + step]) for i in range(0, len(body), step)]
    return b"".join(parts)


class AmqpClient:
    """A connection of the broker's own AMQP 0-9-1 clients (publisher, consumer): finds a
    node that answers and opens the connection and channel 1; subclasses read frames
    (``_expect``) and set the channel up (``_setup_channel``)."""

    broker: RabbitmqBroker
    connection_name: str
    sock: Any
    poller: Any
    frame_max: int
    heartbeat = 0  # seconds: none unless a subclass asks

    def _connect(self, deadline: float) -> None:
        errors = []
        for params in self.broker._parameters(self.connection_name):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._open(params, min(remaining, params.socket_timeout or 10.0))
                self.broker._worked(params)
                return
            except (Broken, *RECOVERABLE) as e:
                self._close_socket()
                if isinstance(e, Broken) and e.code in (*FATAL_CODES, 404):
                    raise  # wrong credentials or vhost, no such queue: the other nodes say the same
                errors.append(f"{params.host}:{params.port}: {e}")
        raise Broken("; ".join(errors) or "no time left to connect")

    def _open(self, params: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((params.host, params.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if params.ssl_options is not None:
            options = params.ssl_options
            sock = options.context.wrap_socket(sock, server_hostname=options.server_hostname or params.host)
        self.sock = sock
        self._opened(sock)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        sock.sendall(pika.frame.ProtocolHeader().marshal())
        start = self._expect(spec.Connection.Start, deadline)
        mechanism, response = params.credentials.response_for(start)
        if mechanism is None:
            raise Broken(f"RabbitMQ offers no authentication mechanism this URL can use: {start.mechanisms}")
        capabilities = {
            "publisher_confirms": True,
            "basic.nack": True,
            "consumer_cancel_notify": True,
            "connection.blocked": True,
            "authentication_failure_close": True,
        }
        properties = {**params.client_properties, "capabilities": capabilities, "platform": "Python"}
        self._send_method(0, spec.Connection.StartOk(properties, mechanism, response, params.locale))
        tune = self._expect(spec.Connection.Tune, deadline)
        self.frame_max = min(x for x in (params.frame_max, tune.frame_max, 131072) if x)
        channel_max = min(x for x in (params.channel_max, tune.channel_max, 2047) if x)
        if self.heartbeat:
            wanted = params.heartbeat if params.heartbeat is not None else tune.heartbeat
            self.heartbeat = min(x for x in (wanted, 60) if x) if wanted else 0
        self._send_method(0, spec.Connection.TuneOk(channel_max, self.frame_max, self.heartbeat))
        self._send_method(0, spec.Connection.Open(params.virtual_host))
        self._expect(spec.Connection.OpenOk, deadline)
        self._send_method(1, spec.Channel.Open())
        self._expect(spec.Channel.OpenOk, deadline)
        self._setup_channel(deadline)

    def _opened(self, sock: Any) -> None:
        """A new socket: forget what the old one had."""

    def _setup_channel(self, deadline: float) -> None:
        """Channel 1 is open."""

    def _expect(self, kind: Any, deadline: float) -> Any:
        raise NotImplementedError

    def _send_method(self, channel: int, method: Any) -> None:
        self.sock.sendall(pika.frame.Method(channel, method).marshal())

    def _close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


class Publisher(AmqpClient):
    """One thread's publishing connection: a minimal AMQP 0-9-1 client on pika's codec.

    ``publish`` writes and returns once fewer than ``limit`` messages are unconfirmed
    (the window); unconfirmed messages are kept and published again on a new connection
    when the old one fails. Only the owning thread uses it, except the sweeper and flush,
    which hold ``lock``.
    """

    # No heartbeats: an idle publisher is not closed, and a dead one shows when a confirm
    # does not come (confirm_timeout).
    heartbeat = 0

    def __init__(self, broker: RabbitmqBroker) -> None:
        self.broker = broker
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.thread = weakref.ref(threading.current_thread())
        self.connection_name = f"djqueue publisher pid={self.pid} thread={threading.current_thread().name}"
        self.sock: Any = None
        self.poller: Any = None
        self.rx = b""
        self.frame_max = 131072
        self.next_tag = 1
        self.outbox: collections.deque[Pending] = collections.deque()
        self.unconfirmed: dict[int, Pending] = {}
        self.unconfirmed_bytes = 0
        self.returned: list[Pending] = []
        self.returning: list[Any] | None = None  # [basic.return, body size, chunks]
        self.blocked: str | None = None
        self.retry_at = 0.0
        self.backoff = 0.1
        # After a channel close the oldest message is sent alone (the probe) until it is
        # confirmed: a close while it is alone in flight is its doing, for certain.
        self.probing = False
        self.probe: Pending | None = None
        self.refusals = 0  # channel closes while the probe was alone in flight
        # Closed by the broker's close(): never published on again (under the lock).
        self.retired = False
        # The messages of the publish() under way: its caller is told if one is refused.
        self.sending: list[Pending] = []

    def waiting(self) -> bool:
        """Whether messages of this thread still wait for a confirm or to be published
        again. Exact when no other thread holds the lock; True while one does: the sweeper
        may be moving a message from one list to another (returned, refused, published
        again), and for that moment it is in none of them, where flush() and the check
        before an ack must not take it for confirmed."""
        if not self.lock.acquire(blocking=False):
            return True
        try:
            return self.holds_messages()
        finally:
            self.lock.release()

    def confirm_held(self, timeout: int | None = None) -> None:
        """With the lock held: wait until RabbitMQ confirmed every message this publisher
        holds (publishing again what must be). Connects for nothing when it holds none."""
        if self.holds_messages():
            self.publish([], 1, timeout)

    def holds_messages(self) -> bool:
        """``waiting()`` without the lock: a hint, wrong for a moment while another thread
        moves a message."""
        return bool(self.unconfirmed or self.outbox or self.returned)

    def thread_alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive()

    # -- the public verbs, called with ``lock`` held --------------------------------

    def publish(self, entries: list[Pending], limit: int, timeout: int | None = None) -> None:
        self.outbox.extend(entries)
        self.sending = entries
        try:
            self._run(limit, timeout or self.broker.confirm_timeout)
        except ConnectionError:
            # The caller is told these failed: do not publish them behind its back.
            for entry in entries:
                self._withdraw(entry)
            raise
        finally:
            self.sending = []

    def sweep(self) -> None:
        now = time.monotonic()
        if now < self.retry_at:
            return
        try:
            if self.sock is not None:
                self._pump(0)
            oldest = next(iter(self.unconfirmed.values()), None)
            if oldest is not None and now - oldest.sent_at > self.broker.confirm_timeout / 1000:
                self._drop("no confirm within confirm_timeout")
            if self.sock is None or self.outbox or self.returned:
                self._run(2**62, min(1000, self.broker.confirm_timeout))
            self.backoff = 0.1
        except (ConnectionError, BrokerError) as e:
            waiting = len(self.outbox) + len(self.returned)
            logger.warning("%d unconfirmed message(s) will be published again: %s", waiting, e)
            self.retry_at = now + self.backoff
            self.backoff = min(self.backoff * 2, 30.0)
        except (*RECOVERABLE, Broken) as e:
            try:
                self._lost(e)
            except ConnectionError:
                pass  # a refused message was dropped, and _lost logged it

    def close(self) -> None:
        if self.sock is not None and self.pid == os.getpid():
            try:
                self._send_method(
                    0, spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
                )
                self._expect(spec.Connection.CloseOk, time.monotonic() + 1)
            except Exception:
                pass
        self._close_socket()

    # -- the engine -----------------------------------------------------------------

    def _run(self, limit: int, timeout: int) -> None:
        deadline = time.monotonic() + timeout / 1000
        backoff = 0.05
        while True:
            try:
                if self.sock is None:
                    self._connect(deadline)
                self._send_outbox()
                self._pump(0)
                while self.outbox or self.returned or self._full(limit):
                    self._republish_returned()
                    self._send_outbox()
                    if self._full(limit) or (self.probing and self.unconfirmed):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            self._drop("no confirm in time")
                            raise ConnectionError(self._failure("RabbitMQ did not confirm in time"))
                        self._pump(remaining)
                return
            except (Broken, *RECOVERABLE) as e:
                self._lost(e)
                if isinstance(e, Broken) and e.code in FATAL_CODES:
                    raise ConnectionError(self._failure(f"RabbitMQ refused the connection: {e}")) from None
                if isinstance(e, Broken) and e.code == 404:
                    try:
                        for queue_name in {entry.queue_name for entry in self.outbox}:
                            self.broker._redeclare(queue_name)
                    except Exception:
                        # What was not found may be missing still: that proves nothing
                        # against the message, which must not be dropped for it.
                        self.refusals = 0
                        raise
                if time.monotonic() + backoff >= deadline:
                    raise ConnectionError(self._failure(f"cannot publish to RabbitMQ: {e}")) from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def _full(self, limit: int) -> bool:
        unconfirmed = self.unconfirmed
        return len(unconfirmed) >= limit or bool(
            unconfirmed and self.unconfirmed_bytes > MAX_UNCONFIRMED_BYTES
        )

    def _forget(self, tag: int) -> Pending | None:
        entry = self.unconfirmed.pop(tag, None)
        if entry is not None:
            self.unconfirmed_bytes -= len(entry.body)
            if entry is self.probe:  # confirmed, refused with a nack, returned or withdrawn
                self.probing, self.probe, self.refusals = False, None, 0
        return entry

    def _failure(self, text: str) -> str:
        if self.blocked:
            text += f" (RabbitMQ blocks publishers: {self.blocked})"
        waiting = len(self.outbox) + len(self.returned)
        return f"{text}; {waiting} message(s) of this thread are waiting to be published again"

    def _withdraw(self, entry: Pending) -> None:
        if entry in self.returned:  # returned while its own send waited
            self.returned.remove(entry)
            return
        try:
            self.outbox.remove(entry)
        except ValueError:
            for tag, pending in list(self.unconfirmed.items()):
                if pending is entry:
                    self._forget(tag)

    def _send_outbox(self) -> None:
        confirm = self.broker.confirm_delivery
        while self.outbox:
            if self.probing:
                if self.unconfirmed:
                    return  # the probe is in flight
                if self.outbox[0] is not self.probe:
                    self.probe, self.refusals = self.outbox[0], 0
            batch: list[Pending] = []
            chunks: list[bytes] = []
            size = 0
            for entry in self.outbox:
                data = publish_frames(
                    entry.exchange,
                    entry.routing_key,
                    entry.body,
                    entry.priority,
                    self.frame_max,
                    entry.headers,
                )
                batch.append(entry)
                chunks.append(data)
                size += len(data)
                if size > 262144 or self.probing:
                    break
            self.sock.sendall(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            now = time.monotonic()
            for entry in batch:
                self.outbox.popleft()
                entry.sent_at = now
                if confirm:
                    self.unconfirmed[self.next_tag] = entry
                    self.unconfirmed_bytes += len(entry.body)
                self.next_tag += 1
            if self.outbox:
                self._pump(0)  # read confirms between large batches

    def _republish_returned(self) -> None:
        returned = self.returned
        while returned:
            entry = returned[0]
            if entry.returns > 2:
                returned.pop(0)
                reason = (
                    f"RabbitMQ returned it as unroutable {entry.returns} times, its queue "
                    f"{entry.queue_name!r} declared again each time (exchange {entry.exchange.decode()!r}, "
                    f"routing key {entry.routing_key.decode()!r})"
                )
                logger.error(
                    "cannot publish message %s: %s; it was %s",
                    _message_id(entry.body),
                    reason,
                    self._dead_letter(entry, reason),
                )
                continue
            try:
                self.broker._redeclare(entry.queue_name)
            except Exception as e:
                # Kept, as unconfirmed messages are: the flush or send waiting for them
                # fails, and the sweeper or the next send tries again.
                raise ConnectionError(
                    self._failure(
                        f"cannot publish a message RabbitMQ returned as unroutable: declaring "
                        f"{entry.queue_name!r} again failed ({type(e).__name__}: {e})"
                    )
                ) from None
            self.outbox.append(returned.pop(0))

    def _lost(self, error: BaseException) -> None:
        """The connection failed: ``_drop`` it. Raises ConnectionError, once, when that
        drops a message RabbitMQ refused MAX_REFUSALS times."""
        refused = None
        if isinstance(error, Broken) and error.channel and self.broker.confirm_delivery:
            in_flight = list(self.unconfirmed.values())
            if self.probing and len(in_flight) == 1 and in_flight[0] is self.probe:
                self.refusals += 1
                if self.refusals >= MAX_REFUSALS:
                    refused = self.probe
            else:
                self.probing = True  # which message it was shows when the oldest goes alone
        self._drop(str(error))
        if refused is None:
            return
        self.outbox.remove(refused)
        self.probing, self.probe, self.refusals = False, None, 0
        reason = f"RabbitMQ refused it {MAX_REFUSALS} times ({error})"
        told = any(refused is entry for entry in self.sending)
        text = (
            f"RabbitMQ refused message {_message_id(refused.body)} for {refused.queue_name!r} "
            f"{MAX_REFUSALS} times ({error}); it was {self._dead_letter(refused, reason, told=told)}"
        )
        logger.error("%s", text)
        raise ConnectionError(self._failure(text))

    def _dead_letter(self, entry: Pending, reason: str, *, told: bool = False) -> str:
        """Hand a message this thread gives up publishing to the broker's dead-letter hooks,
        as a worker does with a message that failed for good, so that it is not lost with
        it (the DeadLetters middleware stores its row). ``told``: the send of that very
        message is about to raise. What became of it, for the log."""
        try:
            proxy = MessageProxy(Message.decode(entry.body), data=entry.body)
        except DecodeError as e:  # a body of enqueue_raw's
            proxy = MessageProxy.malformed(entry.body, e, entry.queue_name)
        proxy.fail(reason)
        # A message an earlier send returned for, under another transaction or none: its
        # row must not roll back with the transaction this thread has open. Nor can an
        # event loop's thread (an async actor's, an async view's) use the ORM.
        transaction = _open_transaction()
        try:
            if transaction is not None and (told or transaction == "sqlite"):
                # The caller's own message, whose send raises: its transaction decides, as
                # it does for everything else it wrote. SQLite has one writer, which this
                # transaction may hold: another connection would wait until its timeout.
                self._emit_nack(proxy)
                if proxy.dead_lettered:
                    return "dead-lettered (a DeadLetter row, in this thread's open transaction)"
            elif transaction is not None or _in_event_loop():
                _on_a_thread_of_its_own(self._emit_nack, proxy)
            else:
                self._emit_nack(proxy)
        except Exception:
            logger.exception("could not dead-letter message %s", proxy.message_id)
            return "dropped"
        return "dead-lettered (a DeadLetter row)" if proxy.dead_lettered else "dropped"

    def _emit_nack(self, proxy: MessageProxy) -> None:
        # The before-hooks only: they store rows, where an after-hook may send (an
        # on_failure callback), which under this thread's publisher lock would hang.
        self.broker.emit_before("nack", proxy)

    def _drop(self, reason: str) -> None:
        """Forget the connection; its unconfirmed messages go first in the outbox."""
        if self.sock is not None:
            logger.info(
                "publisher connection lost (%s); %d message(s) to publish again",
                reason,
                len(self.unconfirmed),
            )
        self._close_socket()
        self.outbox.extendleft(reversed(list(self.unconfirmed.values())))
        self.unconfirmed.clear()
        self.unconfirmed_bytes = 0

    def _close_socket(self) -> None:
        self.rx, self.returning = b"", None
        super()._close_socket()

    # -- connecting -----------------------------------------------------------------

    def _opened(self, sock: Any) -> None:
        self.rx, self.next_tag, self.blocked = b"", 1, None

    def _setup_channel(self, deadline: float) -> None:
        if self.broker.confirm_delivery:
            self._send_method(1, spec.Confirm.Select())
            self._expect(spec.Confirm.SelectOk, deadline)
        self.sock.settimeout(self.broker.confirm_timeout / 1000)

    def _expect(self, kind: Any, deadline: float) -> Any:
        while True:
            for frame in self._frames():
                if isinstance(frame, pika.frame.Method):
                    if isinstance(frame.method, kind):
                        return frame.method
                    self._handle(frame)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._recv(remaining):
                raise Broken(f"RabbitMQ did not answer with {kind.NAME} in time")

    # -- reading --------------------------------------------------------------------

    def _recv(self, timeout: float) -> bool:
        sock = self.sock
        buffered = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not buffered and not self.poller.poll(max(0, int(timeout * 1000 + 0.999))):
            return False
        try:
            data = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            return False
        if not data:
            raise Broken("RabbitMQ closed the connection")
        self.rx += data
        return True

    def _frames(self) -> Any:
        while self.rx:
            consumed, frame = pika.frame.decode_frame(self.rx)
            if frame is None:
                return
            self.rx = self.rx[consumed:]
            yield frame

    def _pump(self, timeout: float) -> None:
        if self._recv(timeout) or self.rx:
            for frame in self._frames():
                self._handle(frame)

    def _handle(self, frame: Any) -> None:
        if isinstance(frame, pika.frame.Method):
            method = frame.method
            if isinstance(method, spec.Basic.Ack | spec.Basic.Nack):
                self._confirmed(method.delivery_tag, method.multiple, isinstance(method, spec.Basic.Ack))
            elif isinstance(method, spec.Basic.Return):
                self.returning = [method, 0, []]
            elif isinstance(method, spec.Connection.Blocked):
                self.blocked = method.reason or "resource alarm"
                logger.warning("RabbitMQ blocks publishers: %s", self.blocked)
            elif isinstance(method, spec.Connection.Unblocked):
                self.blocked = None
            elif isinstance(method, spec.Connection.Close):
                self._try_send(0, spec.Connection.CloseOk())
                raise Broken(
                    f"RabbitMQ closed the connection: {method.reply_code} {method.reply_text}",
                    method.reply_code,
                )
            elif isinstance(method, spec.Channel.Close):
                self._try_send(1, spec.Channel.CloseOk())
                raise Broken(
                    f"RabbitMQ closed the channel: {method.reply_code} {method.reply_text}",
                    method.reply_code,
                    channel=True,
                )
        elif self.returning is not None:
            if isinstance(frame, pika.frame.Header):
                self.returning[1] = frame.body_size
            elif isinstance(frame, pika.frame.Body):
                self.returning[2].append(frame.fragment)
            if sum(len(chunk) for chunk in self.returning[2]) >= self.returning[1]:
                method, _, chunks = self.returning
                self.returning = None
                self._on_return(method, b"".join(chunks))

    def _try_send(self, channel: int, method: Any) -> None:
        try:
            self._send_method(channel, method)
        except OSError:
            pass

    def _confirmed(self, tag: int, multiple: bool, ok: bool) -> None:
        tags = list(itertools.takewhile(lambda t: t <= tag, self.unconfirmed)) if multiple else [tag]
        for one in tags:
            entry = self._forget(one)
            if entry is not None and not ok:
                logger.warning(
                    "RabbitMQ refused a message for %r (basic.nack); publishing it again", entry.queue_name
                )
                self.outbox.append(entry)

    def _on_return(self, method: Any, body: bytes) -> None:
        exchange, routing_key = method.exchange.encode(), method.routing_key.encode()
        for tag, entry in self.unconfirmed.items():
            if entry.exchange == exchange and entry.routing_key == routing_key and entry.body == body:
                # Its ack follows; it must not count as delivered.
                self._forget(tag)
                entry.returns += 1
                self.returned.append(entry)
                logger.warning(
                    "RabbitMQ returned a message for %r as unroutable (%s %s)",
                    entry.queue_name,
                    method.reply_code,
                    method.reply_text,
                )
                return
        logger.error("RabbitMQ returned an unroutable message for routing key %r", method.routing_key)


def _open_transaction() -> str | None:
    """The vendor of a database on which this thread has a transaction open, or None."""
    from django.db import connections

    vendors = {
        connection.vendor
        for connection in connections.all(initialized_only=True)
        if connection.in_atomic_block or (connection.connection is not None and not connection.autocommit)
    }
    if not vendors:
        return None
    return "sqlite" if "sqlite" in vendors else vendors.pop()


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _on_a_thread_of_its_own(function: Any, *args: Any) -> None:
    """Run ``function`` on a new thread and wait for it. Django gives each thread its own
    database connections, so what it writes commits at once, outside any transaction
    of the calling thread."""
    from django.db import connections

    raised: list[BaseException] = []

    def run() -> None:
        try:
            function(*args)
        except BaseException as e:
            raised.append(e)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=f"{threading.current_thread().name}-dead-letter")
    thread.start()
    thread.join()
    if raised:
        raise raised[0]


def _message_id(body: bytes) -> str:
    """The id of the message in ``body``, for a log."""
    try:
        return Message.decode(body).message_id
    except DecodeError:
        return _guess_message_id(body) or "(not a djqueue message)"
