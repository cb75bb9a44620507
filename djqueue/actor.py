"""Actors: functions that run in workers, and the @actor decorator."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from django.core.exceptions import ImproperlyConfigured

from . import conf
from .brokers.base import validate_queue_name
from .errors import ConfigurationError
from .message import Message, current_millis

if TYPE_CHECKING:
    from .brokers.base import Broker

P = ParamSpec("P")
R = TypeVar("R")

# Options handled by Actor itself rather than by a middleware.
CORE_OPTIONS = frozenset({"priority", "queue_name", "actor_name", "broker"})
# Options that may be given per message but not per actor.
MESSAGE_ONLY_OPTIONS = frozenset({"unique_key", "unique_ttl", "pipe_ignore", "pipe_target"})
# Every message option no middleware declares ("eta" and "retries" are set by djqueue).
_OTHER_MESSAGE_OPTIONS = CORE_OPTIONS | MESSAGE_ONLY_OPTIONS | {"eta", "retries"}
# Unknown options that are habits from Celery (or Dramatiq), and what djqueue calls them.
_OPTION_HINTS = {
    "countdown": "use delay= in milliseconds (countdown=10, in seconds, is delay=10_000)",
    "expires": "use max_age= in milliseconds, counted from the send",
    "queue": "use queue_name=",
    "name": "use actor_name=",
    "link": "use on_success=",
    "link_error": "use on_failure=",
    "soft_time_limit": "use time_limit= in milliseconds",
    "default_retry_delay": "use min_backoff= in milliseconds",
    "ignore_result": "results are kept only with store_results=True",
}


def _hints(names: set[str]) -> str:
    return "".join(f"; {name}: {_OPTION_HINTS[name]}" for name in sorted(names) if name in _OPTION_HINTS)


def _validate_values(
    broker: Broker, actor_name: str, options: dict[str, Any], given: set[str], where: str
) -> None:
    """Ask each middleware declaring one of the ``given`` options to check the values in
    ``options``; a ConfigurationError says ``where`` (the @actor or the send)."""
    for middleware in broker.middleware:
        if not middleware.actor_options.isdisjoint(given):
            try:
                middleware.validate_actor_options(actor_name, options)
            except ConfigurationError as e:
                raise ConfigurationError(f"{where}: {e}") from None


class Actor(Generic[P, R]):
    """A function that can be run by workers. Built with ``@actor``."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        broker: Broker,
        actor_name: str,
        queue_name: str,
        priority: int,
        options: dict[str, Any],
    ) -> None:
        self.fn = fn
        self.broker = broker
        self.actor_name = actor_name
        self.queue_name = validate_queue_name(queue_name)
        self.priority = priority
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature: inspect.Signature | None = None
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", actor_name)
        self.__module__ = getattr(fn, "__module__", None)  # type: ignore[assignment]
        broker.declare_actor(self)

    @property
    def signature(self) -> inspect.Signature:
        if self._signature is None:
            self._signature = inspect.signature(self.fn)
        return self._signature

    def check_arguments(self, args: Any, kwargs: dict[str, Any]) -> str | None:
        """Why ``args``/``kwargs`` cannot be passed to the function, or None if they can."""
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as e:
            return f"arguments do not match {self.actor_name}{self.signature}: {e}"
        return None

    def message(self, *args: P.args, **kwargs: P.kwargs) -> Message:
        """An unsent message for this actor, e.g. for ``group`` or ``pipeline``."""
        return self.message_with_options(args=args, kwargs=kwargs)

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Message:
        queue_name = self.queue_name
        priority = self.priority
        if options:  # most sends have none: skip the checks
            unknown = options.keys() - self.broker.actor_options - _OTHER_MESSAGE_OPTIONS
            if unknown:
                raise ConfigurationError(
                    f"unknown message option(s) {', '.join(sorted(unknown))} for actor {self.actor_name}"
                    + _hints(unknown)
                )
            queue_name = options.pop("queue_name", queue_name)
            if queue_name != self.queue_name:
                validate_queue_name(queue_name)
            priority = options.pop("priority", priority)
            given = options.keys() & self.broker.actor_options
            fixed = sorted(n for n in given & self.broker.actor_only_options if options[n] is not None)
            if fixed:
                raise ConfigurationError(
                    f"{', '.join(fixed)} cannot be given per message for actor {self.actor_name}: "
                    f"set {'them' if len(fixed) > 1 else 'it'} on the actor (@actor({fixed[0]}=...)), "
                    "which the worker reads"
                )
            if given:
                # As a worker reads them: the message's value, else (None too) the actor's.
                merged = {**self.options, **{k: v for k, v in options.items() if v is not None}}
                _validate_values(
                    self.broker,
                    self.actor_name,
                    merged,
                    given,
                    f"message options for actor {self.actor_name}",
                )
        if priority:
            options["priority"] = int(priority)
        return Message(
            queue_name=queue_name,
            actor_name=self.actor_name,
            args=tuple(args),
            kwargs=dict(kwargs) if kwargs else {},
            options=options,
        )

    def send(self, *args: P.args, **kwargs: P.kwargs) -> Message:
        """Enqueue a message for this actor; returns it (its ``message_id`` identifies the job)."""
        return self.send_with_options(args=args, kwargs=kwargs)  # type: ignore[return-value]

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: int | None = None,
        eta: datetime | None = None,
        **options: Any,
    ) -> Message | None:
        """Enqueue with per-message options. ``delay`` is in ms; ``eta`` an aware datetime.

        Returns the message, or None when ``unique_key=`` is held by another pending
        message. With ``DJQUEUE["ENQUEUE_ON_COMMIT"]`` the message is enqueued when the
        current transaction commits (dropped on rollback) and returned at once.
        """
        if eta is not None:
            if delay is not None:
                raise ConfigurationError("pass either delay= or eta=, not both")
            if not isinstance(eta, datetime) or eta.tzinfo is None:
                shown = "a naive datetime" if isinstance(eta, datetime) else repr(eta)
                raise ConfigurationError(
                    f"eta= must be an aware datetime (with tzinfo), not {shown}: e.g. "
                    "django.utils.timezone.now() + timedelta(minutes=5); for a delay use "
                    "delay= in milliseconds"
                )
            delay = max(0, int(eta.timestamp() * 1000) - current_millis())
        if delay is not None and (not isinstance(delay, int | float) or delay < 0):
            raise ConfigurationError(f"delay= must be a number of milliseconds >= 0, not {delay!r}")
        message = self.message_with_options(args=args, kwargs=kwargs, **options)
        if _enqueue_on_commit():
            return self._send_on_commit(message, delay)
        return self._enqueue(message, delay)

    def _enqueue(self, message: Message, delay: int | None) -> Message | None:
        if "unique_key" in message.options:
            from .middleware.unique import enqueue_unique

            return enqueue_unique(self.broker, message, delay)
        return self.broker.enqueue(message, delay=delay)

    def _send_on_commit(self, message: Message, delay: int | None) -> Message | None:
        from django.db import transaction

        if "unique_key" in message.options:
            from .middleware.unique import UniqueJobs

            # Only look now: a key claimed by a transaction that rolls back would stay
            # held until its TTL. The claim itself happens at commit.
            unique = self.broker.get_middleware(UniqueJobs)
            if unique is not None and unique.holder(message) is not None:
                return None
        if delay:
            # The delay counts from the call, as it would without ENQUEUE_ON_COMMIT, and
            # the message returned now carries the eta it will be stored with.
            message = message.copy(options={"eta": current_millis() + int(delay)})
        transaction.on_commit(lambda: self._enqueue(message, None))
        return message

    def send_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> Message:
        """Enqueue when the current database transaction commits (at once outside one).

        Returns the message at call time, so its id can be stored in the same transaction.
        """
        from django.db import transaction

        message = self.message(*args, **kwargs)
        transaction.on_commit(lambda: self.broker.enqueue(message))
        return message

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, as a plain call."""
        if self.is_async:
            from .middleware.asyncio import run_coroutine

            return run_coroutine(self.fn(*args, **kwargs))  # type: ignore[arg-type]
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Actor({self.actor_name!r}, queue_name={self.queue_name!r})"


@overload
def actor(fn: Callable[P, R], /) -> Actor[P, R]: ...


@overload
def actor(
    fn: None = None,
    /,
    *,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    broker: Broker | None = None,
    **options: Any,
) -> Callable[[Callable[P, R]], Actor[P, R]]: ...


def actor(
    fn: Callable[P, R] | None = None,
    /,
    *,
    actor_name: str | None = None,
    queue_name: str = "default",
    priority: int = 0,
    broker: Broker | None = None,
    **options: Any,
) -> Actor[P, R] | Callable[[Callable[P, R]], Actor[P, R]]:
    """Turn a function into an actor.

    The actor's name defaults to the function's dotted path (``shop.tasks.send_receipt``),
    which is also how crontabs and dead letters refer to it. Options (times in ms):
    ``queue_name``, ``priority`` (higher runs first), ``max_retries``, ``min_backoff``,
    ``max_backoff``, ``retry_when``, ``throws``, ``time_limit``, ``max_age``,
    ``store_results``, ``on_success``, ``on_failure``, and those of any extra middleware.
    An unknown option, or a value the middleware declaring it refuses, is a
    ConfigurationError here, at import.
    """

    def decorator(fn: Callable[P, R]) -> Actor[P, R]:
        from .brokers import get_broker

        target = broker or get_broker()
        name = actor_name or f"{fn.__module__}.{fn.__qualname__}"
        invalid = set(options) - target.actor_options
        if invalid:
            raise ConfigurationError(
                f"@actor {name}: unknown option(s) {', '.join(sorted(invalid))}{_hints(invalid)}; "
                f"known options: {', '.join(sorted(target.actor_options | {'queue_name', 'priority'}))}"
            )
        if not isinstance(priority, int):
            raise ConfigurationError(f"@actor {name}: priority must be an int, not {priority!r}")
        _validate_values(target, name, options, set(options), f"@actor {name}")
        existing = target.actors.get(name)
        if existing is not None and _origin(existing.fn) != _origin(fn):
            raise ConfigurationError(
                f"@actor {name}: an actor with this name is already registered "
                f"({_origin(existing.fn)}); pass actor_name= to tell them apart"
            )
        return Actor(
            fn,
            broker=target,
            actor_name=name,
            queue_name=queue_name,
            priority=priority,
            options=options,
        )

    if fn is None:
        return decorator
    if not callable(fn):
        # @actor("name"): the Dramatiq/Celery habit of naming the actor positionally.
        hint = f"; to name the actor write @actor(actor_name={fn!r})" if isinstance(fn, str) else ""
        raise TypeError(f"@actor takes the function as its only positional argument, not {fn!r}{hint}")
    return decorator(fn)


def _enqueue_on_commit() -> bool:
    try:
        return bool(conf.get_cached("ENQUEUE_ON_COMMIT"))
    except ImproperlyConfigured:
        # Brokers may be used before (or without) Django settings; then there is no transaction.
        return False


def _origin(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
