"""The RabbitMQ broker: ``amqp://`` and ``amqps://`` URLs, built on pika.

Topology, per djqueue queue ``q``, declared on the queue's first use in a process (a
send, a consumer, stats), never when an actor is defined: that happens at import time
in every Django process, where RabbitMQ may be down or not needed at all. Every
declaration is idempotent and uses the same arguments, so re-declaring never fails:

- ``q``: durable; a nacked message is dead-lettered into ``q.DQ``; ``x-max-priority``
  on classic queues.
- Classic queues are lazy (``x-queue-mode``): RabbitMQ keeps their messages on disk, not
  in memory, as every classic queue of RabbitMQ 3.12 and later does.
- ``q.RQ``: messages delivered before and never settled (their process died, or a
  connection dropped), sent round again with their delivery count in a header. Each
  consumer takes at most one of them at a time, so a job that kills its process is
  never again fetched alongside other messages, and MaxDeliveries can count its
  deliveries on classic queues too.
- ``q.DQ``: dead letters, each expiring ``dead_letter_ttl`` ms after it arrived.
- ``q.XQ.0`` ... ``q.XQ.29``: delay levels. Level k keeps a message exactly 2**k ms
  (a queue-wide ``x-message-ttl``), then dead-letters it to the next level down.

Delays are held by RabbitMQ, never in worker memory. A delay of d ms is written in
binary in the routing key; the message enters the level of d's highest set bit and then
passes through the level of every other set bit on its way down (topic exchanges
``djqueue.delay.<k>`` route on one bit each), so it waits exactly d ms. Every message in
a level waits the same time, so the head of a level always expires first: a long delay
never holds up a shorter one.

Publishing uses one connection per thread, a small AMQP client on pika's frame codec:
a publish writes to the socket and returns, the message stays in the thread's memory
until RabbitMQ confirms it, and it is published again on a new connection if the old one
fails. Each consumer has its own connection, read by the same kind of client
(rabbitmq_consumer.py): worker threads write their acks straight to its socket. See
docs/rabbitmq-broker.md.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

try:
    import pika
    import pika.exceptions
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"the RabbitMQ broker needs pika ({e}): pip install 'djqueue[rabbitmq]'") from None

from ..errors import BrokerError, ConfigurationError, ConnectionError
from ..message import Message, current_millis
from . import mask_url
from .base import Broker, Consumer, QueueStats, refuse_unknown_options
from .rabbitmq_consumer import RabbitmqConsumer, close_quietly, redelivered_queue
from .rabbitmq_publisher import RECOVERABLE, Pending, Publisher, publish_frames

logger = logging.getLogger("djqueue.broker.rabbitmq")

DELAY_LEVELS = 30
MAX_DELAY = 2**DELAY_LEVELS - 1  # ms (about 12.4 days); longer delays take several trips
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
# RabbitMQ keeps a sub-queue per level and walks them for every message; it recommends
# 1 to 5 levels. At 10, a drain cost RabbitMQ a third more CPU than at 5 (benchmarks/).
DEFAULT_MAX_PRIORITY = 5
DEFAULT_DEAD_LETTER_TTL = 7 * 24 * 3600 * 1000
SWEEP_INTERVAL = 0.25  # s between checks of idle threads' unconfirmed messages
QUEUE_TYPES = ("classic", "quorum")

_live_brokers: weakref.WeakSet[RabbitmqBroker] = weakref.WeakSet()


# Queues of this broker's own beside each queue q: q.DQ, q.RQ, q.XQ.0 ... (module doc).
_COMPANION = re.compile(r"^(?P<queue>.+)(?P<suffix>\.DQ|\.RQ|\.XQ\.[0-9]+)$")
_COMPANIONS = {".DQ": "dead letters", ".RQ": "redelivered messages", ".XQ": "delayed messages"}


def dead_letter_queue(queue_name: str) -> str:
    return f"{queue_name}.DQ"


def delay_queue(queue_name: str, level: int) -> str:
    return f"{queue_name}.XQ.{level}"


def delay_exchange(level: int) -> str:
    return f"djqueue.delay.{level}"


def _bit_pattern(level: int, bit: str, tail: str) -> str:
    # One topic word per level, highest level first; only this level's word is tested.
    words = ["*"] * DELAY_LEVELS
    words[DELAY_LEVELS - 1 - level] = bit
    return ".".join([*words, tail])


def delay_route(queue_name: str, delay: int) -> tuple[str, str]:
    """(exchange, routing key) that brings a message to ``queue_name`` after ``delay`` ms
    (clamped to 1 .. MAX_DELAY)."""
    delay = min(max(int(delay), 1), MAX_DELAY)
    bits = ".".join("1" if delay >> k & 1 else "0" for k in reversed(range(DELAY_LEVELS)))
    return delay_exchange(delay.bit_length() - 1), f"{bits}.{queue_name}"


def split_urls(url: str | None, urls: Iterable[str] | None = None) -> list[str]:
    """Every URL of ``url`` (``;``-separated) and ``urls``, in order, without repeats."""
    found: list[str] = []
    for part in [*(url or "").split(";"), *(urls or ())]:
        part = part.strip()
        if part and part not in found:
            found.append(part)
    return found


def _default_dead_letter_ttl() -> int:
    try:
        from django.conf import settings

        if settings.configured:
            from .. import conf

            return int(conf.get("DEAD_LETTER_TTL"))
    except Exception:  # a plain library use without Django settings
        pass
    return DEFAULT_DEAD_LETTER_TTL


class RabbitmqBroker(Broker):
    """Queues in RabbitMQ. ``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS);
    several URLs separated by ``;`` (or ``urls=[...]``) name the nodes of a cluster.

    Options: ``queue_type`` ("classic" or "quorum"), ``max_priority`` (5; 0 turns
    priorities off), ``lazy_queues`` (True: classic queues keep their messages on disk,
    not in RabbitMQ's memory), ``dead_letter_ttl`` (ms; default DJQUEUE["DEAD_LETTER_TTL"]),
    ``confirm_delivery`` (True), ``max_unconfirmed`` (10,000 messages per thread; 1
    makes every publish wait for its confirm), ``confirm_timeout`` (10,000 ms).
    """

    scheme = "amqp"
    supports_cancel = False

    def __init__(
        self,
        middleware: Any = None,
        *,
        url: str | None = None,
        urls: Iterable[str] | None = None,
        queue_type: str = "classic",
        max_priority: int = DEFAULT_MAX_PRIORITY,
        lazy_queues: bool = True,
        dead_letter_ttl: int | None = None,
        confirm_delivery: bool = True,
        max_unconfirmed: int = 10_000,
        confirm_timeout: int = 10_000,
        **kwargs: Any,
    ) -> None:
        refuse_unknown_options("RabbitMQ", RabbitmqBroker.__init__, kwargs, from_url=["url"])
        self.urls = split_urls(url, urls) or [DEFAULT_URL]
        for one in self.urls:
            self.check_url(one)
        if queue_type not in QUEUE_TYPES:
            raise ConfigurationError(f"queue_type must be 'classic' or 'quorum', not {queue_type!r}")
        if not isinstance(max_priority, int) or not 0 <= max_priority <= 255:
            raise ConfigurationError(
                f"max_priority must be a whole number from 0 to 255, not {max_priority!r}"
            )
        if not isinstance(lazy_queues, bool):
            raise ConfigurationError(f"lazy_queues must be True or False, not {lazy_queues!r}")
        for name, value in (("max_unconfirmed", max_unconfirmed), ("confirm_timeout", confirm_timeout)):
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive whole number, not {value!r}")
        self.queue_type = queue_type
        self.max_priority = max_priority if queue_type == "classic" else 0
        self.lazy_queues = lazy_queues and queue_type == "classic"
        self.dead_letter_ttl = int(dead_letter_ttl or _default_dead_letter_ttl())
        self.confirm_delivery = bool(confirm_delivery)
        self.max_unconfirmed = max_unconfirmed
        self.confirm_timeout = confirm_timeout
        self.supports_priority = self.max_priority > 0
        self._preferred = 0  # index of the URL that last worked
        self._admin_lock = threading.RLock()
        self._admin: tuple[Any, Any] | None = None
        self._exchanges_declared = False
        self._declared: set[str] = set()  # queues declared on RabbitMQ (by this process or its parent)
        self._delays_declared: set[str] = set()
        self._reset_process_state()
        super().__init__(middleware, **kwargs)
        _live_brokers.add(self)

    def _reset_process_state(self) -> None:
        # Sockets are never shared with a forked child: it starts from scratch.
        self._pid = os.getpid()
        self._local = threading.local()
        self._publishers: list[Publisher] = []
        self._publishers_lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._closing = threading.Event()
        self._admin = None
        self._consumers: weakref.WeakSet[RabbitmqConsumer] = weakref.WeakSet()
        self._consumers_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitmqBroker:
        return cls(url=url, **options)

    @classmethod
    def check_url(cls, url: str) -> None:
        for part in split_urls(url) or [url]:
            scheme = part.split("://", 1)[0].lower() if "://" in part else ""
            if scheme not in ("amqp", "amqps"):
                raise ConfigurationError(
                    f"{mask_url(part)!r} is not an amqp:// or amqps:// URL "
                    "(e.g. 'amqp://guest:guest@localhost:5672/%2F'; separate cluster nodes with ';')"
                )
            try:
                params = pika.URLParameters(part)
            except Exception as e:
                raise ConfigurationError(f"{mask_url(part)!r} is not a valid RabbitMQ URL: {e}") from None
            if not params.host:
                raise ConfigurationError(f"{mask_url(part)!r} names no host")

    def describe(self) -> str:
        extra = ", quorum queues" if self.queue_type == "quorum" else ""
        return f"{mask_url(';'.join(self.urls))}{extra}"

    # -- connections --------------------------------------------------------------

    def _parameters(self, connection_name: str) -> list[Any]:
        """pika parameters for every URL, the one that last worked first."""
        order = self.urls[self._preferred :] + self.urls[: self._preferred]
        result = []
        for one in order:
            params = pika.URLParameters(one)
            params.client_properties = {"connection_name": connection_name, "product": "djqueue"}
            result.append(params)
        return result

    def _worked(self, params: Any) -> None:
        for index, one in enumerate(self.urls):
            parsed = pika.URLParameters(one)
            if (parsed.host, parsed.port, parsed.virtual_host) == (
                params.host,
                params.port,
                params.virtual_host,
            ):
                self._preferred = index
                return

    def _blocking_connection(self, connection_name: str, **settings: Any) -> Any:
        """A pika connection to the first node that answers, the last good one first."""
        errors = []
        for params in self._parameters(connection_name):
            for name, value in settings.items():
                setattr(params, name, value)
            try:
                connection = pika.BlockingConnection(params)
            except RECOVERABLE as e:
                errors.append(f"{params.host}:{params.port}: {e!r}")
                continue
            self._worked(params)
            return connection
        raise ConnectionError(
            f"cannot connect to RabbitMQ at {mask_url(';'.join(self.urls))}: {'; '.join(errors)}"
        )

    def _admin_call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(channel)`` on this process's admin connection, reconnecting once."""
        with self._admin_lock:
            for attempt in (1, 2):
                if self._pid != os.getpid():
                    self._reset_process_state()
                if self._admin is None:
                    # No heartbeats: it is idle most of the time, and used from any thread.
                    connection = self._blocking_connection(f"djqueue admin pid={os.getpid()}", heartbeat=0)
                    self._admin = (connection, connection.channel())
                connection, channel = self._admin
                try:
                    return fn(channel)
                except pika.exceptions.ChannelClosedByBroker as e:
                    self._admin = None
                    close_quietly(connection)
                    if e.reply_code == 406:
                        raise ConfigurationError(
                            f"RabbitMQ refused a declaration: {e.reply_text}. A queue exists with "
                            "other arguments than these broker options (queue_type, max_priority, "
                            "lazy_queues, dead_letter_ttl) give it: set the options back, or delete "
                            "the queue (after draining it) so that it is declared again."
                        ) from None
                    if attempt == 2:
                        raise BrokerError(
                            f"RabbitMQ closed the channel: {e.reply_code} {e.reply_text}"
                        ) from None
                    self._exchanges_declared = False
                except RECOVERABLE as e:
                    self._admin = None
                    close_quietly(connection)
                    if attempt == 2:
                        raise ConnectionError(f"lost the connection to RabbitMQ: {e!r}") from None
        raise AssertionError("unreachable")

    # -- topology -----------------------------------------------------------------

    def _queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead_letter_queue(queue_name),
        }
        if self.max_priority:
            arguments["x-max-priority"] = self.max_priority
        return self._typed(arguments, dead_letters=True)

    def _typed(self, arguments: dict[str, Any], *, dead_letters: bool) -> dict[str, Any]:
        if self.lazy_queues:
            # A lazy queue takes in a persistent message with about a fifth less of
            # RabbitMQ's CPU (it is written to disk either way; lazy keeps no copy in
            # memory), and a backlog of millions cannot push RabbitMQ into its memory
            # alarm, which would block every publisher. RabbitMQ 3.12 and later ignore
            # the argument: their classic queues always work this way.
            arguments["x-queue-mode"] = "lazy"
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
            if dead_letters:
                # Without these, a quorum queue may drop a message it dead-letters.
                arguments["x-dead-letter-strategy"] = "at-least-once"
                arguments["x-overflow"] = "reject-publish"
        return arguments

    def _declare_main(self, channel: Any, queue_name: str) -> None:
        arguments = self._queue_arguments(queue_name)
        channel.queue_declare(queue_name, durable=True, arguments=arguments)
        channel.queue_declare(redelivered_queue(queue_name), durable=True, arguments=arguments)
        channel.queue_declare(
            dead_letter_queue(queue_name),
            durable=True,
            arguments=self._typed({"x-message-ttl": self.dead_letter_ttl}, dead_letters=False),
        )

    def _declare_delay_levels(self, channel: Any, queue_name: str) -> None:
        # 61 round trips: done once per process and queue, when it first needs a delay.
        if not self._exchanges_declared:
            for level in range(DELAY_LEVELS):
                channel.exchange_declare(delay_exchange(level), "topic", durable=True)
            for level in range(1, DELAY_LEVELS):
                channel.exchange_bind(
                    destination=delay_exchange(level - 1),
                    source=delay_exchange(level),
                    routing_key=_bit_pattern(level, "0", "#"),
                )
            self._exchanges_declared = True
        for level in range(DELAY_LEVELS):
            name = delay_queue(queue_name, level)
            arguments: dict[str, Any] = {"x-message-ttl": 2**level}
            if level:
                arguments["x-dead-letter-exchange"] = delay_exchange(level - 1)
            else:
                arguments.update({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue_name})
            channel.queue_declare(name, durable=True, arguments=self._typed(arguments, dead_letters=True))
            channel.queue_bind(name, delay_exchange(level), routing_key=_bit_pattern(level, "1", queue_name))
        channel.queue_bind(queue_name, delay_exchange(0), routing_key=_bit_pattern(0, "0", queue_name))

    def _declare_queue(self, queue_name: str) -> None:
        # Nothing on RabbitMQ yet: actors declare their queues at import time (see the
        # module's doc). A name this broker gives another queue's companion would be
        # declared with the wrong arguments, or consume that queue's dead letters.
        match = _COMPANION.match(queue_name)
        if match is not None:
            raise ConfigurationError(
                f"invalid queue name {queue_name!r}: the RabbitMQ broker keeps the "
                f"{_COMPANIONS[match['suffix'][:3]]} of queue {match['queue']!r} in a queue of that name; "
                "use a name that does not end in '.DQ', '.RQ' or '.XQ.<number>'"
            )

    def ensure_queue(self, queue_name: str) -> None:
        """Declare the queue on RabbitMQ now, if this process has not yet. Raises
        ConfigurationError if it exists with other arguments, ConnectionError if RabbitMQ
        cannot be reached."""
        self.declare_queue(queue_name)
        if queue_name not in self._declared:
            self._admin_call(lambda channel: self._declare_main(channel, queue_name))
            self._declared.add(queue_name)

    def _declare_delays(self, queue_name: str) -> None:
        if queue_name not in self._delays_declared:
            self.ensure_queue(queue_name)  # level 0 dead-letters into it
            self._admin_call(lambda channel: self._declare_delay_levels(channel, queue_name))
            self._delays_declared.add(queue_name)

    def _redeclare(self, queue_name: str) -> None:
        logger.warning("declaring the RabbitMQ queues of %r again (were they deleted?)", queue_name)
        self._exchanges_declared = False
        self._declared.discard(queue_name)
        self._delays_declared.discard(queue_name)
        self.ensure_queue(queue_name)
        self._declare_delays(queue_name)

    def delete_queue(self, queue_name: str) -> None:
        """Delete the queue with its dead-letter and delay queues, messages included."""
        self.flush()

        def delete(channel: Any) -> None:
            for name in self._all_queues(queue_name):
                channel.queue_delete(name)

        self._admin_call(delete)
        self.queues.discard(queue_name)
        self._declared.discard(queue_name)
        self._delays_declared.discard(queue_name)

    @staticmethod
    def _all_queues(queue_name: str) -> list[str]:
        levels = [delay_queue(queue_name, level) for level in range(DELAY_LEVELS)]
        return [queue_name, redelivered_queue(queue_name), dead_letter_queue(queue_name), *levels]

    # -- publishing ---------------------------------------------------------------

    def _publisher(self) -> Publisher:
        if self._pid != os.getpid():
            with self._admin_lock:
                self._reset_process_state()
        publisher: Publisher | None = getattr(self._local, "publisher", None)
        if publisher is None or publisher.retired:
            publisher = self._local.publisher = Publisher(self)
            with self._publishers_lock:
                self._publishers.append(publisher)
                # Without confirms too: the sweeper closes the connections of threads
                # that exited (a thread-per-request server would leak one per request).
                if self._sweeper is None and not self._closing.is_set():
                    self._sweeper = threading.Thread(
                        target=_sweep,
                        args=(weakref.ref(self),),
                        name="djqueue-rabbitmq-confirms",
                        daemon=True,
                    )
                    self._sweeper.start()
        return publisher

    def _pending(self, queue_name: str, data: bytes, priority: int, eta: Any) -> Pending:
        if queue_name not in self._declared:
            self.ensure_queue(queue_name)
        delay = eta - current_millis() if isinstance(eta, int | float) else 0
        if delay > 0:
            self._declare_delays(queue_name)
            exchange, routing_key = delay_route(queue_name, int(delay))
        else:
            exchange, routing_key = "", queue_name
        priority = min(max(int(priority), 0), self.max_priority)
        return Pending(queue_name, exchange.encode(), routing_key.encode(), data, priority)

    def _enqueue(self, message: Message, data: bytes) -> None:
        entry = self._pending(message.queue_name, data, message.priority, message.eta)
        self._publish([entry], self.max_unconfirmed)

    def _enqueue_many(self, prepared: list[tuple[Message, bytes]]) -> None:
        entries = [self._pending(m.queue_name, data, m.priority, m.eta) for m, data in prepared]
        self._publish(entries, self.max_unconfirmed)  # confirmed as single sends are

    def enqueue_raw(self, queue_name: str, data: bytes) -> None:
        """Put arbitrary bytes on a queue, as a misbehaving producer would (for tests)."""
        self.ensure_queue(queue_name)
        self._publish([Pending(queue_name, b"", queue_name.encode(), data, 0)], 1)

    def _publish(self, entries: list[Pending], limit: int) -> None:
        while True:
            publisher = self._publisher()
            with publisher.lock:
                # close() may have retired it while this thread waited for its lock: a
                # message published on it then would be tracked by nothing. _publisher()
                # gives this thread a new one.
                if not publisher.retired:
                    publisher.publish(entries, limit)
                    return

    def flush(self, timeout: int | None = None) -> None:
        """Wait until RabbitMQ has confirmed every message this process published through
        this broker. Raises ConnectionError if some could not be confirmed in time."""
        with self._publishers_lock:
            publishers = list(self._publishers) if self._pid == os.getpid() else []
        for publisher in publishers:
            if publisher.waiting():
                with publisher.lock:
                    # waiting() is True while another thread holds the lock, perhaps with
                    # nothing left by the time this one has it.
                    publisher.confirm_held(timeout)

    def _flush_thread(self) -> None:
        # Called before acking: what a job enqueued is confirmed before its message is acked.
        publisher: Publisher | None = getattr(self._local, "publisher", None)
        if publisher is not None and publisher.waiting() and publisher.pid == os.getpid():
            with publisher.lock:
                publisher.confirm_held()

    # -- consuming and inspecting ---------------------------------------------------

    def consume(self, queue_name: str, *, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        try:
            self.ensure_queue(queue_name)
        except ConnectionError as e:
            # The consumer connects when RabbitMQ is back, and declares the queue then;
            # it logs each attempt that fails, this one included.
            logger.debug("could not declare %r yet: %s", queue_name, e)
        consumer = RabbitmqConsumer(self, queue_name, prefetch, timeout)
        with self._consumers_lock:
            self._consumers.add(consumer)
        return consumer

    def _counts(self, queue_name: str) -> tuple[int, int, int]:
        def count(channel: Any) -> tuple[int, int, int]:
            def depth(name: str) -> int:
                return int(channel.queue_declare(name, passive=True).method.message_count)

            levels = sum(depth(delay_queue(queue_name, level)) for level in range(DELAY_LEVELS))
            ready = depth(queue_name) + depth(redelivered_queue(queue_name))
            return ready, levels, depth(dead_letter_queue(queue_name))

        try:
            return self._admin_call(count)  # type: ignore[no-any-return]
        except BrokerError as e:
            if isinstance(e, ConnectionError) or "NOT_FOUND" not in str(e):
                raise
            self._redeclare(queue_name)
            return self._admin_call(count)  # type: ignore[no-any-return]

    def get_queue_stats(self, queue_name: str) -> QueueStats:
        """ready and dead from RabbitMQ; delayed from the delay levels; in_flight counts only
        the unacked deliveries held by this process's consumers."""
        self.ensure_queue(queue_name)
        self._declare_delays(queue_name)
        self.flush()
        ready, delayed, dead = self._counts(queue_name)
        with self._consumers_lock:
            consumers = [c for c in self._consumers if c.queue_name == queue_name]
        in_flight = sum(c.holding() for c in consumers)
        return QueueStats(ready, delayed, in_flight, dead)

    def purge(self, queue_name: str) -> None:
        """Drop the ready, delayed and dead-lettered messages of the queue."""
        self.ensure_queue(queue_name)
        self._declare_delays(queue_name)
        self.flush()

        def purge(channel: Any) -> None:
            for name in self._all_queues(queue_name):
                channel.queue_purge(name)

        self._admin_call(purge)

    def cancel(self, message_id: str, *, queue_name: str | None = None) -> bool:
        """Not supported: RabbitMQ cannot remove a message by id. Always False."""
        return False

    def close(self) -> None:
        """Publish what is unconfirmed, then close this process's connections. The broker
        can still be used afterwards: it connects again."""
        if self._pid != os.getpid():
            return
        self._closing.set()
        try:
            self.flush()
        except ConnectionError as e:
            logger.error("closing the RabbitMQ broker with unconfirmed messages: %s", e)
        if self._sweeper is not None:
            self._sweeper.join(2)
            self._sweeper = None
        with self._publishers_lock:
            publishers, self._publishers = self._publishers, []
        for publisher in publishers:
            with publisher.lock:
                # A thread may have published on it since the flush above; from here on,
                # none can (see _publish).
                publisher.retired = True
                try:
                    publisher.confirm_held()
                except ConnectionError as e:
                    logger.error("closing the RabbitMQ broker with unconfirmed messages: %s", e)
                publisher.close()
        with self._admin_lock:
            if self._admin is not None:
                close_quietly(self._admin[0])
                self._admin = None
        self._local = threading.local()
        self._closing.clear()


def _sweep(broker_ref: weakref.ref[RabbitmqBroker]) -> None:
    """Collects confirms for threads that stopped publishing, publishes their
    unconfirmed messages again if their connection failed, and closes the connections
    of threads that exited."""
    while True:
        broker = broker_ref()
        if broker is None or broker._closing.is_set() or broker._pid != os.getpid():
            return
        closing = broker._closing
        with broker._publishers_lock:
            publishers = list(broker._publishers)
        for publisher in publishers:
            # Unlocked: waiting() would take the lock for a moment, and a thread's own
            # waiting() would then answer True. A live thread's publisher missed is seen on
            # the next round.
            if not publisher.holds_messages():
                if not publisher.thread_alive() and publisher.lock.acquire(blocking=False):
                    try:
                        # Again under the lock: a flush() may have been moving a message of
                        # it, or its thread published once more before it exited.
                        if not publisher.holds_messages():
                            with broker._publishers_lock:
                                if publisher in broker._publishers:
                                    broker._publishers.remove(publisher)
                            publisher.close()
                    finally:
                        publisher.lock.release()
                continue
            if publisher.lock.acquire(blocking=False):
                try:
                    publisher.sweep()
                except Exception:  # e.g. a redeclaration refused: keep sweeping the others
                    logger.exception("checking unconfirmed RabbitMQ messages failed")
                finally:
                    publisher.lock.release()
        del broker, publishers
        if closing.wait(SWEEP_INTERVAL):
            return


@atexit.register
def _flush_at_exit() -> None:
    for broker in list(_live_brokers):
        if broker._pid != os.getpid():
            continue
        try:
            broker.flush()
        except Exception as e:
            logger.error("exiting with RabbitMQ messages that were not confirmed: %s", e)


__all__ = ["RabbitmqBroker", "delay_route", "publish_frames", "redelivered_queue"]
