"""The broker contract: what every broker does, and what the worker relies on.

A broker stores encoded messages in named queues and hands them to consumers. The
worker knows only this module: the database, Redis, RabbitMQ and stub brokers each
implement it in their own module, and one contract suite (``tests/brokers/``) proves
every behaviour described here against each of them.

Delivery is at least once. A consumed message stays owned by its consumer until it is
acked (the actor finished, or the message was dead-lettered) or requeued (graceful
shutdown). If the consumer's process dies, the broker gives the message to another
consumer again: RabbitMQ when the connection drops, Redis and the database broker when
the consumer's heartbeat or lease expires.

All times are in milliseconds.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import ConfigurationError, DecodeError, MessageTooLarge
from ..message import Message, current_millis, generate_unique_id

if TYPE_CHECKING:
    from ..actor import Actor
    from ..middleware.base import Middleware

logger = logging.getLogger("djqueue.broker")

QUEUE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,99}$")
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024

# Every hook a middleware may implement; see middleware/base.py.
HOOKS = (
    "before_ack",
    "after_ack",
    "before_nack",
    "after_nack",
    "before_declare_actor",
    "after_declare_actor",
    "before_declare_queue",
    "after_declare_queue",
    "before_enqueue",
    "after_enqueue",
    "after_enqueue_failed",
    "before_process_message",
    "after_process_message",
    "after_skip_message",
    "before_worker_boot",
    "after_worker_boot",
    "before_worker_shutdown",
    "after_worker_shutdown",
    "before_worker_thread_shutdown",
    "before_consumer_thread_shutdown",
)


def validate_queue_name(queue_name: str) -> str:
    if not isinstance(queue_name, str) or not QUEUE_NAME_RE.match(queue_name):
        raise ConfigurationError(
            f"invalid queue name {queue_name!r}: use 1-100 letters, digits, '_', '.' or '-', "
            "starting with a letter or '_'"
        )
    return queue_name


def refuse_unknown_options(
    name: str,
    init: Callable[..., Any],
    options: Iterable[str],
    *,
    also: Iterable[str] = (),
    also_described: str = "",
    from_url: Iterable[str] = (),
) -> None:
    """Raise ConfigurationError if ``options`` (a broker's DJQUEUE["BROKER_OPTIONS"]) has a
    name the ``name`` broker does not take, listing those it does: the keyword-only
    parameters of its ``init`` but ``middleware`` and those its URL gives (``from_url``),
    ``max_message_size``, and ``also`` (named in the message as ``also_described``, e.g.
    "an argument of redis.Redis")."""
    parameters = inspect.signature(init).parameters.values()
    not_options = {"middleware", *from_url}
    known = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in not_options]
    known.append("max_message_size")  # Broker's own
    extra = sorted(also)
    unknown = sorted(set(options) - set(known) - set(extra))
    if not unknown:
        return
    named = []
    for option in unknown:
        close = difflib.get_close_matches(option, known + extra, n=1)
        named.append(f"{option} (did you mean {close[0]}?)" if close else option)
    if also_described:
        valid = f"{', '.join(known)} or {also_described}"
    else:
        valid = f"{', '.join(known[:-1])} or {known[-1]}"
    raise ConfigurationError(f"unknown {name} broker option(s) {', '.join(named)}: use {valid}")


class QueueStats(NamedTuple):
    """Counts for one queue. ``dead`` is what the broker itself still keeps."""

    ready: int
    delayed: int
    in_flight: int
    dead: int


class MessageProxy:
    """A consumed message plus what the broker and the worker need to know about it.

    Attribute reads fall through to the message, so middleware can treat a proxy as the
    message it wraps.
    """

    def __init__(
        self,
        message: Message,
        *,
        data: bytes | None = None,
        tag: Any = None,
        delivery_count: int = 1,
        decode_error: DecodeError | None = None,
    ) -> None:
        self.message = message
        self.data = data
        self.tag = tag
        self.delivery_count = delivery_count
        self.decode_error = decode_error
        self.failed = False
        self.reason: str | None = None
        self.exception: BaseException | None = None
        self.traceback: str | None = None
        self.result: Any = None
        # Set by the DeadLetters middleware once the DeadLetter row is stored: a broker
        # whose nack drops the message (the database broker) keeps it while this is False.
        self.dead_lettered = False

    @classmethod
    def malformed(
        cls, data: bytes, error: DecodeError, queue_name: str, *, tag: Any = None, delivery_count: int = 1
    ) -> MessageProxy:
        """A proxy for bytes that did not decode; the worker dead-letters it with the reason."""
        message = Message(
            queue_name=queue_name,
            actor_name="",
            args=(),
            kwargs={},
            options={},
            message_id=_guess_message_id(data) or generate_unique_id(),
            message_timestamp=current_millis(),
        )
        proxy = cls(message, data=data, tag=tag, delivery_count=delivery_count, decode_error=error)
        proxy.fail(str(error))
        return proxy

    def fail(self, reason: str | None = None) -> None:
        """Mark the message failed for good: the worker will nack (dead-letter) it."""
        self.failed = True
        if reason is not None:
            self.reason = reason

    def stuff_exception(self, exception: BaseException) -> None:
        self.exception = exception
        self.traceback = "".join(traceback.format_exception(exception))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def __repr__(self) -> str:
        return f"MessageProxy({self.message!r})"


def _guess_message_id(data: bytes) -> str | None:
    match = re.search(rb'"message_id"\s*:\s*"([0-9a-fA-F-]{36})"', data[:4096] if data else b"")
    return match.group(1).decode() if match else None


class Consumer(Iterator["MessageProxy | None"]):
    """Yields messages from one queue, holding at most ``prefetch`` unacked ones.

    ``next()`` returns a MessageProxy, or None when nothing arrived within the
    consumer's timeout, so the calling thread can check whether it should stop.
    Bytes that do not decode are yielded as ``MessageProxy.malformed(...)``, never
    raised: one bad payload must not stop a consumer.

    ``ack``, ``nack`` and ``requeue`` may be called from any thread (the worker calls
    them from its worker threads); a broker whose client is not thread-safe marshals
    them onto the consumer's own thread. ``__next__`` and ``close`` are called from the
    consumer's thread only.
    """

    def __next__(self) -> MessageProxy | None:
        raise NotImplementedError("subclasses of Consumer must implement __next__()")

    def ack(self, proxy: MessageProxy) -> None:
        """The actor finished: forget the message."""
        raise NotImplementedError("subclasses of Consumer must implement ack()")

    def nack(self, proxy: MessageProxy) -> None:
        """The message failed for good: move it to the broker's dead letters."""
        raise NotImplementedError("subclasses of Consumer must implement nack()")

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        """Give unstarted (or abandoned) messages back to their queue, at once."""
        raise NotImplementedError("subclasses of Consumer must implement requeue()")

    def close(self) -> None:
        """Release connections; unacked messages go back to the queue."""


class Broker:
    """Stores messages in queues; base of every broker.

    Subclasses implement ``_enqueue``, ``consume``, ``_declare_queue``,
    ``get_queue_stats``, ``purge``, ``cancel`` and ``close``. Optional abilities are
    flags: ``supports_transactions`` (an enqueue inside ``transaction.atomic()`` is
    rolled back with it), ``supports_priority``, ``supports_cancel``.
    """

    scheme = ""
    supports_transactions = False
    supports_priority = True
    supports_cancel = True

    def __init__(
        self,
        middleware: Iterable[Middleware] | None = None,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.actors: dict[str, Actor] = {}
        self.queues: set[str] = set()
        self.middleware: list[Middleware] = []
        self.max_message_size = max_message_size
        self._hooks: dict[str, list[Any]] = {name: [] for name in HOOKS}
        # Computed once per middleware change: every send validates options against it.
        self._actor_options: frozenset[str] = frozenset()
        self._actor_only_options: frozenset[str] = frozenset()
        if middleware is None:
            from ..middleware import default_middleware

            middleware = default_middleware()
        for m in middleware:
            self.add_middleware(m)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Broker:
        """Build the broker from its URL; must not connect (checks call it)."""
        raise NotImplementedError("subclasses of Broker must implement from_url()")

    @classmethod
    def check_url(cls, url: str) -> None:
        """Raise ConfigurationError saying what is wrong with ``url``; must not connect."""

    # -- middleware ---------------------------------------------------------------

    def add_middleware(self, middleware: Middleware, *, before: type | None = None) -> None:
        if before is not None:
            index = next(i for i, m in enumerate(self.middleware) if isinstance(m, before))
            self.middleware.insert(index, middleware)
        else:
            self.middleware.append(middleware)
        self._rebuild_hooks()
        for actor in self.actors.values():
            unknown = set(actor.options) - self.actor_options
            if unknown:
                logger.warning("actor %s has options no middleware handles: %s", actor.actor_name, unknown)

    def _rebuild_hooks(self) -> None:
        from ..middleware.base import Middleware

        self._actor_options = frozenset().union(*(m.actor_options for m in self.middleware))
        self._actor_only_options = frozenset().union(*(m.actor_only_options for m in self.middleware))
        # Only overridden hooks are called: the hot path never pays for no-op methods.
        for name in HOOKS:
            base = getattr(Middleware, name)
            self._hooks[name] = [
                getattr(m, name) for m in self.middleware if getattr(type(m), name, base) is not base
            ]

    def get_middleware(self, kind: type) -> Any:
        return next((m for m in self.middleware if isinstance(m, kind)), None)

    @property
    def actor_options(self) -> frozenset[str]:
        """Every option some middleware declares; kept up to date by add_middleware."""
        return self._actor_options

    @property
    def actor_only_options(self) -> frozenset[str]:
        """Those of actor_options a message cannot override; kept up to date likewise."""
        return self._actor_only_options

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Run every middleware's before_<signal>; an exception propagates to the caller."""
        for hook in self._hooks["before_" + signal]:
            hook(self, *args, **kwargs)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """Run every after_<signal> in reverse order; a failing hook is logged, never fatal."""
        for hook in reversed(self._hooks["after_" + signal]):
            try:
                hook(self, *args, **kwargs)
            except Exception:
                logger.exception("middleware hook %s failed", getattr(hook, "__qualname__", hook))

    # -- actors and queues --------------------------------------------------------

    def declare_actor(self, actor: Actor) -> None:
        self.emit_before("declare_actor", actor)
        self.declare_queue(actor.queue_name)
        self.actors[actor.actor_name] = actor
        self.emit_after("declare_actor", actor)

    def get_actor(self, actor_name: str) -> Actor | None:
        return self.actors.get(actor_name)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name in self.queues:
            return
        validate_queue_name(queue_name)
        self.emit_before("declare_queue", queue_name)
        self._declare_queue(queue_name)
        self.queues.add(queue_name)
        self.emit_after("declare_queue", queue_name)

    def ensure_queue(self, queue_name: str) -> None:
        """Declare the queue and create it on the broker now if the broker creates queues
        at all (RabbitMQ does, on a queue's first use in a process). ``runworkers`` calls
        it at start, so a queue the broker refuses fails the start rather than a job."""
        self.declare_queue(queue_name)

    def get_declared_queues(self) -> set[str]:
        return set(self.queues)

    # -- sending ------------------------------------------------------------------

    def prepare(self, message: Message, *, delay: int | None = None) -> tuple[Message, bytes]:
        """Run the before_enqueue hooks and encode; shared by enqueue and enqueue_many."""
        if delay is not None and delay > 0:
            message = message.copy(options={"eta": current_millis() + int(delay)})
        self.declare_queue(message.queue_name)
        self.emit_before("enqueue", message, delay)
        data = message.encode()
        if len(data) > self.max_message_size:
            raise MessageTooLarge(
                f"message {message.message_id} for {message.actor_name} is {len(data)} bytes, "
                f"over the maximum of {self.max_message_size} (DJQUEUE['MAX_MESSAGE_SIZE']); "
                "pass a reference (a primary key, a file path) instead of the data"
            )
        return message, data

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        """Store ``message``; ``delay`` (ms) postpones it. Returns the message as stored."""
        try:
            message, data = self.prepare(message, delay=delay)
            self._enqueue(message, data)
        except BaseException as e:
            self.emit_after("enqueue_failed", message, delay, e)
            raise
        self.emit_after("enqueue", message, delay)
        return message

    def enqueue_many(self, messages: Iterable[Message], *, delay: int | None = None) -> list[Message]:
        """Store several messages in as few round trips as the broker allows; ``delay``
        (ms) postpones all of them. Every message is prepared (hooks run, encoded, size
        checked) before any is sent: if one cannot be, the error is raised and none of
        the batch is sent."""
        prepared: list[tuple[Message, bytes]] = []
        preparing: Message | None = None
        try:
            for preparing in messages:
                prepared.append(self.prepare(preparing, delay=delay))
                preparing = None
            self._enqueue_many(prepared)
        except BaseException as e:
            # Every message whose before_enqueue hooks may have run, the failing one too.
            failed = [m for m, _ in prepared] + ([preparing] if preparing is not None else [])
            for message in failed:
                self.emit_after("enqueue_failed", message, delay, e)
            raise
        for message, _ in prepared:
            self.emit_after("enqueue", message, delay)
        return [m for m, _ in prepared]

    def _enqueue(self, message: Message, data: bytes) -> None:
        raise NotImplementedError("subclasses of Broker must implement _enqueue()")

    def _enqueue_many(self, prepared: list[tuple[Message, bytes]]) -> None:
        for message, data in prepared:
            self._enqueue(message, data)

    def _declare_queue(self, queue_name: str) -> None:
        raise NotImplementedError("subclasses of Broker must implement _declare_queue()")

    def enqueue_raw(self, queue_name: str, data: bytes) -> None:
        """Store arbitrary bytes on a queue as a misbehaving producer would, bypassing
        encoding and hooks. For tests of how workers survive poison input."""
        raise NotImplementedError("subclasses of Broker must implement enqueue_raw()")

    # -- consuming and inspecting ---------------------------------------------------

    def consume(self, queue_name: str, *, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        """A consumer of ``queue_name`` holding at most ``prefetch`` unacked messages;
        ``next()`` returns None after ``timeout`` ms without a message."""
        raise NotImplementedError("subclasses of Broker must implement consume()")

    def get_queue_stats(self, queue_name: str) -> QueueStats:
        raise NotImplementedError("subclasses of Broker must implement get_queue_stats()")

    def purge(self, queue_name: str) -> None:
        """Drop every ready and delayed message of the queue (not in-flight ones)."""
        raise NotImplementedError("subclasses of Broker must implement purge()")

    def purge_all(self) -> None:
        for queue_name in self.get_declared_queues():
            self.purge(queue_name)

    def cancel(self, message_id: str, *, queue_name: str | None = None) -> bool:
        """Remove a queued or delayed message before it starts; True if found."""
        raise NotImplementedError("subclasses of Broker must implement cancel()")

    def join(self, queue_name: str, *, timeout: int | None = None, interval: int = 20) -> None:
        """Wait until the queue has no ready, delayed or in-flight message (for tests).

        Raises TimeoutError after ``timeout`` ms.
        """
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            stats = self.get_queue_stats(queue_name)
            if stats.ready == stats.delayed == stats.in_flight == 0:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue_name!r} still has work after {timeout} ms: {stats}")
            time.sleep(interval / 1000)

    def close(self) -> None:
        """Release every connection this broker holds."""

    def describe(self) -> str:
        """A description for logs and the start-up banner; never includes a password."""
        return self.scheme + "://"
