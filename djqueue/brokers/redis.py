"""The Redis broker (``redis://`` and ``rediss://``), on redis-py.

Every change to a queue is one atomic Lua script (redis_scripts.py). A consumer takes
up to ``prefetch`` messages per round trip into its own in-flight set, and acks are
buffered and flushed with the next fetch. An idle consumer blocks on a per-queue
wake-up list instead of polling, and wakes when the earliest delayed message is due.
A heartbeat thread per broker keeps its consumers alive and gives back the messages
of consumers whose heartbeat stopped. See docs/redis-broker.md.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import BrokerError, ConfigurationError, ConnectionError, DecodeError
from ..message import Message
from . import mask_url
from . import redis_scripts as lua
from .base import Broker, Consumer, MessageProxy, QueueStats

logger = logging.getLogger("djqueue.broker.redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "djqueue"
DEFAULT_HEARTBEAT_TIMEOUT = 60_000
DEFAULT_DEAD_LETTER_TTL = 7 * 24 * 3600 * 1000
ENQUEUE_CHUNK = 500
PURGE_CHUNK = 1000
# Acks wait at most this long (s) for the next fetch before being flushed on their own.
ACK_FLUSH_DELAY = 0.005
# A nearly full consumer waits this long (s) for more acks, to refill in one round trip.
REFILL_DELAY = 0.002


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError("the Redis broker needs redis-py: pip install 'djqueue[redis]'") from None
    return redis


def _default_dead_letter_ttl() -> int:
    from django.conf import settings

    if settings.configured:
        from .. import conf

        return int(conf.get("DEAD_LETTER_TTL"))
    return DEFAULT_DEAD_LETTER_TTL


def _positive_ms(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"the Redis broker option {name} must be a positive number of ms, not {value!r}"
        )
    return value


class RedisBroker(Broker):
    """Queues in Redis. ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` (TLS).

    Options: ``namespace`` (key prefix, default "djqueue"), ``heartbeat_timeout`` (ms
    without a heartbeat after which a consumer's messages go to other consumers,
    default 60,000), ``dead_letter_ttl`` (ms a dead letter is kept, default
    DJQUEUE["DEAD_LETTER_TTL"], 7 days). Other keyword arguments go to ``redis.Redis``
    (``socket_timeout``, ``ssl_ca_certs``, ...).
    """

    scheme = "redis"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        middleware: Any = None,
        namespace: str = DEFAULT_NAMESPACE,
        heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
        dead_letter_ttl: int | None = None,
        **options: Any,
    ) -> None:
        self.check_url(url)
        if not isinstance(namespace, str) or not namespace or any(c.isspace() for c in namespace):
            raise ConfigurationError(f"the Redis broker namespace must be a word, not {namespace!r}")
        base_options = {k: options.pop(k) for k in ("max_message_size",) if k in options}
        super().__init__(middleware, **base_options)
        self.url = url
        self.namespace = namespace
        self.prefix = namespace + ":"
        self.heartbeat_timeout = _positive_ms("heartbeat_timeout", heartbeat_timeout)
        self.heartbeat_interval = max(10, min(self.heartbeat_timeout // 5, 5000))
        if dead_letter_ttl is None:
            dead_letter_ttl = _default_dead_letter_ttl()
        self.dead_letter_ttl = _positive_ms("dead_letter_ttl", dead_letter_ttl)
        redis = self._redis = _import_redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        unknown = set(options) - set(inspect.signature(redis.Redis.__init__).parameters) - {"self"}
        if unknown:
            raise ConfigurationError(
                f"unknown Redis broker option(s) {', '.join(sorted(unknown))}: use namespace, "
                "heartbeat_timeout, dead_letter_ttl, max_message_size or an argument of redis.Redis"
            )
        options.setdefault("socket_connect_timeout", 5)
        options.setdefault("socket_timeout", 30)
        # No silent retries: a fetch whose reply was lost must surface, so the consumer
        # is closed and its in-flight set given back. Idempotent calls retry here.
        options.setdefault("retry", Retry(NoBackoff(), 0))
        try:
            self.client = redis.Redis.from_url(url, **options)  # connects lazily
        except (TypeError, ValueError) as e:
            raise ConfigurationError(f"bad Redis broker option for {mask_url(url)}: {e}") from None
        socket_timeout = options.get("socket_timeout")
        self.max_block = max(0.01, socket_timeout - 1) if socket_timeout else 3600.0
        self.scripts = {name: self.client.register_script(getattr(lua, name.upper())) for name in lua.SCRIPTS}
        self.consumers: dict[str, _RedisConsumer] = {}
        self.consumers_lock = threading.Lock()
        self._heartbeat: _Heartbeat | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        return cls(url, **options)

    @classmethod
    def check_url(cls, url: str) -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ConfigurationError(
                f"the port in {mask_url(url)!r} must be a number between 0 and 65535"
            ) from None
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"{mask_url(url)!r} is not a redis:// or rediss:// URL")
        db = parts.path.strip("/")
        dbs = parse_qs(parts.query).get("db", [])
        for value in ([db] if db else []) + dbs:
            if not value.isdigit():
                raise ConfigurationError(
                    f"the database in {mask_url(url)!r} must be an integer index such as /0, not {value!r}"
                )

    def describe(self) -> str:
        return f"{mask_url(self.url)} (namespace {self.namespace!r})"

    # -- calling Redis --------------------------------------------------------------

    def run(self, script: str, args: list[Any], *, retry: bool = False) -> Any:
        """Run one of the scripts; ``retry`` once on a lost connection, for calls that
        are safe to repeat."""
        try:
            return self.call(self.scripts[script], args=[self.prefix, *args])
        except ConnectionError:
            if not retry:
                raise
        return self.call(self.scripts[script], args=[self.prefix, *args])

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call redis-py, turning its errors into djqueue errors."""
        errors = self._redis.exceptions
        try:
            return fn(*args, **kwargs)
        except (errors.ConnectionError, errors.TimeoutError) as e:
            raise ConnectionError(f"cannot reach Redis at {mask_url(self.url)}: {e}") from e
        except errors.ReadOnlyError as e:  # transient, like a lost connection
            raise ConnectionError(f"Redis at {mask_url(self.url)} is a read-only replica: {e}") from e
        except errors.RedisError as e:
            raise BrokerError(f"Redis broker error: {e}") from e

    # -- sending --------------------------------------------------------------------

    def _declare_queue(self, queue_name: str) -> None:
        # Nothing to create: the enqueue script registers the queue. Declaring happens
        # at import time, when no connection may be made.
        pass

    @staticmethod
    def _fields(message: Message, data: bytes) -> list[Any]:
        priority = max(
            -lua.PRIORITY_LIMIT, min(lua.PRIORITY_LIMIT, int(message.options.get("priority") or 0))
        )
        return [message.message_id, data, priority, int(message.eta or 0)]

    def _enqueue(self, message: Message, data: bytes) -> None:
        self.run("enqueue", [message.queue_name, *self._fields(message, data)], retry=True)

    def _enqueue_many(self, prepared: list[tuple[Message, bytes]]) -> None:
        by_queue: dict[str, list[Any]] = {}
        for message, data in prepared:
            by_queue.setdefault(message.queue_name, []).extend(self._fields(message, data))
        step = ENQUEUE_CHUNK * 4
        calls = [(q, f[i : i + step]) for q, f in by_queue.items() for i in range(0, len(f), step)]
        if len(calls) == 1:
            self.run("enqueue", [calls[0][0], *calls[0][1]], retry=True)
            return
        pipe = self.client.pipeline(transaction=False)
        for queue_name, fields in calls:
            self.scripts["enqueue"](args=[self.prefix, queue_name, *fields], client=pipe)
        self.call(pipe.execute)

    def enqueue_raw(self, queue_name: str, data: bytes) -> None:
        self.declare_queue(queue_name)
        self.run("enqueue", [queue_name, "", data, 0, 0], retry=True)

    # -- consuming and inspecting -----------------------------------------------------

    def consume(self, queue_name: str, *, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        self.declare_queue(queue_name)
        consumer = _RedisConsumer(self, queue_name, prefetch, timeout)
        with self.consumers_lock:
            self.consumers[consumer.cid] = consumer
            if self._heartbeat is None or not self._heartbeat.is_alive():
                self._heartbeat = _Heartbeat(self)
                self._heartbeat.start()
        return consumer

    def get_queue_stats(self, queue_name: str) -> QueueStats:
        self.declare_queue(queue_name)
        ready, delayed, in_flight, dead = self.run("stats", [queue_name, self.dead_letter_ttl], retry=True)
        return QueueStats(ready, delayed, in_flight, dead)

    def purge(self, queue_name: str) -> None:
        self.declare_queue(queue_name)
        # In chunks, so a huge queue never blocks Redis for long.
        while self.run("purge", [queue_name, PURGE_CHUNK], retry=True):
            pass

    def cancel(self, message_id: str, *, queue_name: str | None = None) -> bool:
        queues = [queue_name] if queue_name else []
        return bool(self.run("cancel", [message_id, *queues], retry=True))

    def dead_letters(self, queue_name: str, *, limit: int = 100) -> list[bytes]:
        """Payloads of the most recent dead letters the broker still keeps, newest first."""
        key = f"{self.prefix}q:{queue_name}:"
        tags = self.call(self.client.zrevrange, key + "dead", 0, limit - 1)
        if not tags:
            return []
        return [data for data in self.call(self.client.hmget, key + "dead_msgs", tags) if data is not None]

    def close(self) -> None:
        with self.consumers_lock:
            leftover = list(self.consumers.values())
        for consumer in leftover:
            try:
                consumer.close()
            except Exception:
                logger.exception("could not give back the messages of a consumer of %r", consumer.queue_name)
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop.set()
            heartbeat.join(5)
        self.client.close()


class _Heartbeat(threading.Thread):
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
            args: list[Any] = [broker.heartbeat_timeout if recover else 0]
            for cid, consumer in consumers.items():
                args += [cid, consumer.queue_name]
            missing, recovered = broker.run("heartbeat", args, retry=True)
        for cid in missing:
            consumer = consumers.get(cid.decode())
            if consumer is not None and consumer.registered:
                logger.warning(
                    "consumer of %r had no heartbeat for over %d ms; its messages went to other consumers",
                    consumer.queue_name,
                    broker.heartbeat_timeout,
                )
        if recovered:
            logger.warning(
                "gave back %d message(s) of consumers with no heartbeat for %d ms",
                recovered,
                broker.heartbeat_timeout,
            )


class _RedisConsumer(Consumer):
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
        if self.pending and (self.idle or now - self.pending_since >= ACK_FLUSH_DELAY):
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
            acks, self.pending = self.pending, []
            count = max(0, self.prefetch - len(self.outstanding))
            isolated = "0" if self.isolated is None else "1"
            self.opened_at = None
        try:
            now, first_eta, items = self.broker.run(
                "fetch", [self.queue_name, self.cid, count, isolated, *acks]
            )
        except Exception:
            with self.lock:
                self.pending[:0] = acks  # acks are idempotent: send them again later
            raise
        self.registered = True
        with self.lock:
            for i in range(0, len(items), 3):
                tag = items[i]
                self.outstanding.add(tag)
                if items[i + 2] > lua.ISOLATE_AFTER:
                    self.isolated = tag
                self.buffer.append((tag, items[i + 1], items[i + 2]))
            if count > 0:
                self.idle = not items
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
            never_handed_out = [tag for tag, _, _ in self.buffer]
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
        self.broker.run("ack", [self.queue_name, self.cid, proxy.tag], retry=True)

    def nack(self, proxy: MessageProxy) -> None:
        with self.lock:
            if not self._settle(proxy):
                return
        broker = self.broker
        broker.run("nack", [self.queue_name, self.cid, broker.dead_letter_ttl, proxy.tag], retry=True)

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        with self.lock:
            tags = [proxy.tag for proxy in proxies if self._settle(proxy)]
        if tags:
            self.broker.run("requeue", [self.queue_name, self.cid, *tags], retry=True)
