"""The middleware interface: small classes with before_/after_ hooks.

Every cross-cutting behaviour (retries, time limits, results, dead letters, metrics)
is a middleware, not a branch in the worker. ``before_*`` hooks run in stack order and
may raise to stop what they precede (``SkipMessage`` in before_process_message skips
a message, ``MessageTooLarge`` in before_enqueue refuses it); ``after_*`` hooks run in
reverse order, and an exception in one is logged and never stops the worker. Only the
hooks a class overrides are called.

Each middleware lists the actor options it understands in ``actor_options``; ``@actor``
rejects options no middleware declares, and asks each middleware to check the values of
its own (``validate_actor_options``), so that a wrong value fails at import rather than
on the first failure of every message.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..actor import Actor
    from ..brokers.base import Broker, MessageProxy
    from ..message import Message
    from ..worker import Worker


class Middleware:
    actor_options: frozenset[str] = frozenset()
    # Those of actor_options a message cannot override: read from the actor alone (a
    # function or an exception class does not travel as JSON).
    actor_only_options: frozenset[str] = frozenset()

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        """Raise ConfigurationError if the value of an option this middleware declares is
        wrong, saying which option, its value and what is allowed; the caller adds the
        actor's name (``actor_name`` is for what a middleware logs about a value it
        accepts but doubts).

        Called by ``@actor`` with the actor's options, and by ``send_with_options`` (and
        ``message_with_options``) with the message's options merged over the actor's,
        those set to None (the actor's value) left out; in both cases only when one of
        ``actor_options`` is among the options given. Never on the worker's path: a
        worker copes with whatever a producer sent. ``options`` may hold other
        middleware's options: look only at your own.
        """

    def before_ack(self, broker: Broker, message: MessageProxy) -> None: ...
    def after_ack(self, broker: Broker, message: MessageProxy) -> None: ...
    def before_nack(self, broker: Broker, message: MessageProxy) -> None: ...
    def after_nack(self, broker: Broker, message: MessageProxy) -> None: ...

    def before_declare_actor(self, broker: Broker, actor: Actor) -> None: ...
    def after_declare_actor(self, broker: Broker, actor: Actor) -> None: ...
    def before_declare_queue(self, broker: Broker, queue_name: str) -> None: ...
    def after_declare_queue(self, broker: Broker, queue_name: str) -> None: ...

    def before_enqueue(self, broker: Broker, message: Message, delay: int | None) -> None: ...
    def after_enqueue(self, broker: Broker, message: Message, delay: int | None) -> None: ...
    def after_enqueue_failed(
        self, broker: Broker, message: Message, delay: int | None, exception: BaseException
    ) -> None:
        """The send of ``message`` (or of the batch it was in) raised ``exception`` after
        the before_enqueue hooks may have run for it: undo what they claimed."""

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None: ...
    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None: ...
    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None: ...

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None: ...
    def after_worker_boot(self, broker: Broker, worker: Worker) -> None: ...
    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None: ...
    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None: ...
    def before_worker_thread_shutdown(self, broker: Broker, thread: Any) -> None: ...
    def before_consumer_thread_shutdown(self, broker: Broker, thread: Any) -> None: ...


# -- helpers for validate_actor_options ----------------------------------------------


# Short, and safe for any value a caller may pass (a deeply nested one included).
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 100


def option_error(name: str, value: Any, allowed: str) -> ConfigurationError:
    """The error for option ``name`` given ``value``: "``name`` must be ``allowed``"."""
    return ConfigurationError(f"{name}={_repr.repr(value)} is not valid: {name} must be {allowed}")


def is_whole_number(value: Any, minimum: int) -> bool:
    """``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_milliseconds(value: Any) -> bool:
    """``value`` is a finite int or float (not a bool) >= 0."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )
