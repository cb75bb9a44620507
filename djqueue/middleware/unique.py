"""UniqueJobs: enqueue nothing while a message with the same ``unique_key`` is pending.

``send_with_options(..., unique_key="report-42", unique_ttl=ms)`` claims the key for the
new message's id in the rate-limit store (Redis ``SET`` with ``PX``, or a row with an
expiry). While another message holds the key (queued, delayed or running) the send
enqueues nothing and returns None. The key is freed when the holder is acked or
dead-lettered, when it is cancelled with ``djqueue.cancel()``, or when the TTL ends,
whichever comes first. A retry keeps the key: Retries re-enqueues the same message id,
which refreshes the claim instead of being refused.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, DjqueueError
from ..message import current_millis
from .base import Middleware

if TYPE_CHECKING:
    from ..brokers.base import Broker
    from ..message import Message
    from ..rate_limits.base import RateLimitBackend

logger = logging.getLogger("djqueue.unique")

# How long a key is held when unique_ttl is not given (plus the delay of a delayed message).
DEFAULT_UNIQUE_TTL = 3_600_000


class DuplicateJob(DjqueueError):
    """A message's ``unique_key`` is held by another message; nothing was enqueued."""

    def __init__(self, key: str, holder: str | None) -> None:
        super().__init__(f"unique_key {key!r} is held by message {holder}; not enqueued")
        self.key = key
        self.holder = holder


def unique_key_of(message: Any) -> str | None:
    key = message.options.get("unique_key")
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise ConfigurationError(f"unique_key must be a non-empty string, not {key!r}")
    return key


class UniqueJobs(Middleware):
    """Refuses a second message with the same ``unique_key`` (a per-message option)."""

    def __init__(self, *, backend: RateLimitBackend | None = None, default_ttl: int = DEFAULT_UNIQUE_TTL):
        self._backend = backend
        self.default_ttl = default_ttl
        # The message a worker thread is running, and whether Retries re-enqueued it.
        self._local = threading.local()

    @property
    def backend(self) -> RateLimitBackend:
        if self._backend is not None:
            return self._backend
        from ..rate_limits.backends import get_backend

        return get_backend()

    def ttl_for(self, message: Message) -> int:
        ttl = message.options.get("unique_ttl")
        if ttl is not None:
            if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
                raise ConfigurationError(f"unique_ttl must be a positive number of ms, not {ttl!r}")
            return ttl
        # A delayed message must keep its key at least until it is due.
        wait = max(0, (message.eta or 0) - current_millis())
        return self.default_ttl + wait

    def holder(self, message: Message) -> str | None:
        """The id of another message holding ``message``'s unique key, or None."""
        key = unique_key_of(message)
        if key is None:
            return None
        holder = self.backend.unique_holder("unique:" + key)
        return holder if holder != message.message_id else None

    def release(self, message: Any) -> None:
        key = unique_key_of(message)
        if key is not None:
            self.backend.unique_release("unique:" + key, message.message_id)

    def release_message(self, message_id: str) -> bool:
        """Free the key held by ``message_id`` (after a cancel); True if it held one."""
        return self.backend.unique_release_owner(message_id)

    def before_enqueue(self, broker: Broker, message: Message, delay: int | None) -> None:
        key = unique_key_of(message)
        if key is None:
            return
        if not self.backend.unique_claim("unique:" + key, message.message_id, ttl=self.ttl_for(message)):
            raise DuplicateJob(key, self.backend.unique_holder("unique:" + key))

    def after_enqueue_failed(
        self, broker: Broker, message: Message, delay: int | None, exception: BaseException
    ) -> None:
        # Held, the key would refuse every later send of the job until its TTL. Freed
        # only if this message holds it (not when another's key refused it).
        try:
            self.release(message)
        except ConfigurationError:
            pass  # an invalid unique_key: refused, never claimed

    def after_enqueue(self, broker: Broker, message: Message, delay: int | None) -> None:
        if getattr(self._local, "running", None) == message.message_id:
            self._local.requeued = True

    def before_process_message(self, broker: Broker, message: Any) -> None:
        msg = message.message
        if "unique_key" in msg.options:
            self._local.running = msg.message_id
            self._local.requeued = False

    def after_ack(self, broker: Broker, message: Any) -> None:
        msg = message.message
        local = self._local
        running = getattr(local, "running", None)
        if running is not None:
            local.running = None
            if running == msg.message_id and local.requeued:
                return  # Retries enqueued it again, with the same id: it keeps the key
        if message.decode_error is not None or "unique_key" not in msg.options:
            return
        self.release(msg)

    after_nack = after_ack  # type: ignore[assignment]


def enqueue_unique(broker: Broker, message: Message, delay: int | None) -> Message | None:
    """``broker.enqueue`` for a message with a ``unique_key``: None for a duplicate. (If
    the enqueue fails after claiming the key, ``after_enqueue_failed`` frees it.)"""
    try:
        return broker.enqueue(message, delay=delay)
    except DuplicateJob as e:
        logger.info("not enqueueing %s: %s", message.message_id, e)
        return None


def cancel_message(broker: Broker, message_id: str, queue_name: str | None = None) -> bool:
    """Remove a queued or delayed message before it starts, and free its unique key."""
    found = broker.cancel(message_id, queue_name=queue_name)
    if found:
        unique = broker.get_middleware(UniqueJobs)
        if unique is not None:
            unique.release_message(message_id)
    return found
