"""Retries: re-enqueue a failed message with exponential backoff, or give it up."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError, Retry
from .base import Middleware, is_whole_number, option_error

logger = logging.getLogger("djqueue.retries")

DEFAULT_MAX_RETRIES = 20
DEFAULT_MIN_BACKOFF = 15_000
DEFAULT_MAX_BACKOFF = 604_800_000


def _is_exception_classes(value: Any) -> bool:
    """``value`` is an exception class, or a tuple, list or set of them (maybe empty)."""
    items = value if isinstance(value, tuple | list | set | frozenset) else (value,)
    return all(isinstance(item, type) and issubclass(item, BaseException) for item in items)


def compute_backoff(retries: int, *, min_backoff: int, max_backoff: int, jitter: bool = True) -> int:
    """The delay (ms) before retry number ``retries + 1``: doubling from ``min_backoff``,
    capped at ``max_backoff``, with jitter over the upper half so that a burst of
    failures does not come back as a burst."""
    backoff = min(min_backoff * 2 ** min(retries, 62), max_backoff)
    if jitter:
        backoff = backoff // 2 + random.randint(0, backoff - backoff // 2)
    return max(int(backoff), 0)


class Retries(Middleware):
    """Retries a message whose actor raised, up to ``max_retries`` times.

    Actor options: ``max_retries`` (a whole number >= 0, default 20), ``min_backoff``
    (15 s) and ``max_backoff`` (7 days), whole numbers of ms with min <= max;
    ``retry_when(retries, exception) -> bool`` to decide per failure (then
    ``max_retries`` is not used); ``throws``, an exception class or a tuple of them that
    are dead-lettered at once. Raising ``Retry(delay=ms)`` retries after that delay.
    """

    actor_options = frozenset({"max_retries", "min_backoff", "max_backoff", "retry_when", "throws"})
    actor_only_options = frozenset({"retry_when", "throws"})

    def __init__(
        self,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        min_backoff: int = DEFAULT_MIN_BACKOFF,
        max_backoff: int = DEFAULT_MAX_BACKOFF,
    ) -> None:
        self.max_retries = max_retries
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        if "max_retries" in options and not is_whole_number(options["max_retries"], 0):
            raise option_error(
                "max_retries",
                options["max_retries"],
                "a whole number >= 0 (there is no retry-for-ever value: to retry every failure, "
                "pass retry_when=lambda retries, exception: True)",
            )
        for name in ("min_backoff", "max_backoff"):
            if name in options and not is_whole_number(options[name], 0):
                raise option_error(name, options[name], "a whole number of milliseconds >= 0")
        # Only both given is a contradiction: max_backoff alone below the default
        # min_backoff is a plain cap (every retry waits about max_backoff).
        low, high = options.get("min_backoff"), options.get("max_backoff")
        if low is not None and high is not None and low > high:
            raise ConfigurationError(
                f"min_backoff={low} is more than max_backoff={high}: min_backoff (the first "
                "retry's delay, in ms) must not be more than max_backoff; lower min_backoff "
                "or raise max_backoff"
            )
        retry_when = options.get("retry_when")
        if retry_when is not None and not callable(retry_when):
            raise option_error("retry_when", retry_when, "None or a function (retries, exception) -> bool")
        throws = options.get("throws")
        if throws is not None and not _is_exception_classes(throws):
            hint = f" (pass the class itself: throws={throws})" if isinstance(throws, str) else ""
            raise option_error("throws", throws, f"an exception class, or a tuple or list of them{hint}")

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is None or message.failed:
            return
        try:
            self._retry(broker, message, exception)
        except Exception as e:
            # Junk option values from a misbehaving producer, or a broker that cannot
            # store the retry: dead-letter with the reason, never ack a failure silently.
            logger.error("cannot retry %s: %r", message.message_id, e)
            message.fail(f"could not be retried ({type(e).__name__}: {e})")

    def _retry(self, broker: Any, message: Any, exception: BaseException) -> None:
        actor = broker.actors.get(message.actor_name)
        actor_options = actor.options if actor is not None else {}

        def option(name: str, default: Any) -> Any:
            value = message.options.get(name)
            return value if value is not None else actor_options.get(name, default)

        retries = message.retries
        from .shutdown import Shutdown

        if isinstance(exception, Shutdown):
            # Not the job's fault: put it back without spending a retry.
            broker.enqueue(message.message.copy(options={"eta": None}))
            return
        throws = actor_options.get("throws") or ()
        if isinstance(throws, list | set | frozenset):
            throws = tuple(throws)  # isinstance() takes a class or a tuple of them only
        if throws and isinstance(exception, throws):
            message.fail(f"{type(exception).__name__} is in the actor's throws=, not retried")
            return
        retry_when = actor_options.get("retry_when")
        max_retries = option("max_retries", self.max_retries)
        if retry_when is not None:
            if not retry_when(retries, exception):
                message.fail(f"retry_when declined retry {retries + 1}: {exception!r}")
                return
        elif retries >= max_retries:
            message.fail(f"gave up after {retries} retries: {exception!r}")
            return

        if isinstance(exception, Retry) and exception.delay is not None:
            delay = int(exception.delay)
        else:
            delay = compute_backoff(
                retries,
                min_backoff=option("min_backoff", self.min_backoff),
                max_backoff=option("max_backoff", self.max_backoff),
            )
        logger.info("retrying %s in %d ms (retry %d)", message.message_id, delay, retries + 1)
        broker.enqueue(message.message.copy(options={"retries": retries + 1, "eta": None}), delay=delay)
