"""The Redis broker (``redis://`` and ``rediss://``), on redis-py.

Every change to a queue is one atomic Lua script (redis_scripts.py), run with
``EVALSHA`` by redis_runner.py. A consumer (redis_consumer.py) takes up to
``prefetch`` messages per round trip into its own in-flight set, and acks are
buffered and flushed with the next fetch. An idle consumer blocks on a per-queue
wake-up list instead of polling, and wakes when the earliest delayed message is due.
A heartbeat thread per broker keeps its consumers alive and gives back the messages
of consumers whose heartbeat stopped. See docs/redis-broker.md.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import BrokerError, ConfigurationError, ConnectionError
from ..message import Message
from . import mask_url
from . import redis_scripts as lua
from .base import Broker, Consumer, QueueStats, refuse_unknown_options
from .redis_consumer import Heartbeat, RedisConsumer
from .redis_runner import ScriptRunner, block_limit, pack_four

logger = logging.getLogger("djqueue.broker.redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "djqueue"
DEFAULT_HEARTBEAT_TIMEOUT = 60_000
DEFAULT_DEAD_LETTER_TTL = 7 * 24 * 3600 * 1000
ENQUEUE_CHUNK = 250
PURGE_CHUNK = 1000


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
        redis = _import_redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client_options = set(inspect.signature(redis.Redis.__init__).parameters) - {"self"}
        refuse_unknown_options(
            "Redis",
            RedisBroker.__init__,
            options,
            also=client_options,
            also_described="an argument of redis.Redis",
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
        # From the client, not the options: a socket_timeout in the URL wins over them.
        self.max_block = block_limit(self.client) or 3600.0
        self.runner = ScriptRunner(
            self.client, self.prefix, {name: getattr(lua, name.upper()) for name in lua.SCRIPTS}
        )
        errors = redis.exceptions
        self._lost = (errors.ConnectionError, errors.TimeoutError)
        self._read_only = errors.ReadOnlyError
        self._redis_error = errors.RedisError
        self.consumers: dict[str, RedisConsumer] = {}
        self.consumers_lock = threading.Lock()
        self._heartbeat: Heartbeat | None = None

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

    def run(self, script: str, args: list[Any], *, retry: bool = False, spin: bool = False) -> Any:
        """Run one of the scripts; ``retry`` once on a lost connection, for calls that
        are safe to repeat; ``spin`` for a send's (see redis_runner.py)."""
        try:
            return self.runner.run(script, args, spin=spin)
        except Exception as e:
            error = self._translate(e)
            if error is None:
                raise
            if not (retry and isinstance(error, ConnectionError)):
                raise error from e
        return self.call(self.runner.run, script, args, spin=spin)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call redis-py, turning its errors into djqueue errors."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            error = self._translate(e)
            if error is None:
                raise
            raise error from e

    def _translate(self, e: Exception) -> Exception | None:
        if isinstance(e, self._lost):
            return ConnectionError(f"cannot reach Redis at {mask_url(self.url)}: {e}")
        if isinstance(e, self._read_only):  # transient, like a lost connection
            return ConnectionError(f"Redis at {mask_url(self.url)} is a read-only replica: {e}")
        if isinstance(e, self._redis_error):
            return BrokerError(f"Redis broker error: {e}")
        return None

    # -- sending --------------------------------------------------------------------

    def _declare_queue(self, queue_name: str) -> None:
        # Nothing to create: the enqueue script registers the queue. Declaring happens
        # at import time, when no connection may be made.
        pass

    @staticmethod
    def _fields(message: Message, data: bytes) -> tuple[str, bytes, int, int]:
        options = message.options
        priority = options.get("priority")
        if priority:
            priority = max(-lua.PRIORITY_LIMIT, min(lua.PRIORITY_LIMIT, int(priority)))
        return message.message_id, data, priority or 0, int(options.get("eta") or 0)

    def _enqueue(self, message: Message, data: bytes) -> None:
        self.run("enqueue", [message.queue_name, *self._fields(message, data)], retry=True, spin=True)

    def _enqueue_many(self, prepared: list[tuple[Message, bytes]]) -> None:
        if len(prepared) == 1:
            self._enqueue(*prepared[0])
            return
        by_queue: dict[str, list[bytes]] = {}
        for message, data in prepared:
            mid, _, priority, eta = self._fields(message, data)
            by_queue.setdefault(message.queue_name, []).append(
                pack_four(mid.encode(), data, b"%d" % priority, b"%d" % eta)
            )
        runner = self.runner
        made: list[tuple[str, bytes]] = []

        def calls() -> Iterator[tuple[str, bytes]]:
            # Packed lazily, so that Redis stores one chunk while the next is packed.
            for queue_name, packed in by_queue.items():
                for i in range(0, len(packed), ENQUEUE_CHUNK):
                    chunk = packed[i : i + ENQUEUE_CHUNK]
                    made.append(("enqueue", runner.pack("enqueue", [queue_name], chunk, 4 * len(chunk))))
                    yield made[-1]

        rest = calls()
        replies: list[Any] = []
        try:
            self.call(runner.run_many, rest, replies)
        except ConnectionError:
            # The calls Redis answered stored their chunks. The others are sent once more
            # on a new connection, as a single send is: each message is stored at least
            # once, and only those of a call whose reply was lost may be stored twice.
            self.call(runner.run_many, itertools.chain(made[runner.ran(replies) :], rest))

    def enqueue_raw(self, queue_name: str, data: bytes) -> None:
        self.declare_queue(queue_name)
        self.run("enqueue", [queue_name, "", data, 0, 0], retry=True, spin=True)

    # -- consuming and inspecting -----------------------------------------------------

    def consume(self, queue_name: str, *, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        self.declare_queue(queue_name)
        consumer = RedisConsumer(self, queue_name, prefetch, timeout)
        with self.consumers_lock:
            self.consumers[consumer.cid] = consumer
            if self._heartbeat is None or not self._heartbeat.is_alive():
                self._heartbeat = Heartbeat(self)
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
        # The token tells this call's repetition (its reply was lost) from a later call.
        return bool(self.run("cancel", [message_id, uuid.uuid4().hex, *queues], retry=True))

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
            except ConnectionError as e:
                logger.warning(
                    "could not give back the messages of a consumer of %r (%s); they are delivered "
                    "again once its heartbeat times out",
                    consumer.queue_name,
                    e,
                )
            except Exception:
                logger.exception("could not give back the messages of a consumer of %r", consumer.queue_name)
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop.set()
            heartbeat.join(5)
        self.runner.close()
        self.client.close()
