"""ShutdownNotifications: tell long-running actors that the worker is stopping."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ..errors import DjqueueError
from ..interrupts import interrupt
from .base import Middleware, option_error


class Shutdown(DjqueueError):
    """Raised inside an actor with ``notify_shutdown=True`` when its worker stops.

    The message is retried without counting against ``max_retries``.
    """


class ShutdownNotifications(Middleware):
    """Actor option ``notify_shutdown``: True or False (None: the default, False)."""

    actor_options = frozenset({"notify_shutdown"})
    actor_only_options = frozenset({"notify_shutdown"})

    def __init__(self, *, notify_shutdown: bool = False) -> None:
        self.notify_shutdown = notify_shutdown
        self._running: dict[int, Any] = {}
        self._lock = threading.Lock()

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        value = options.get("notify_shutdown")
        if value is not None and not isinstance(value, bool):
            raise option_error("notify_shutdown", value, "True or False")

    def _wants(self, broker: Any, message: Any) -> bool:
        actor = broker.actors.get(message.message.actor_name)
        value = actor.options.get("notify_shutdown") if actor is not None else None
        return self.notify_shutdown if value is None else bool(value)

    def before_process_message(self, broker: Any, message: Any) -> None:
        if self._wants(broker, message):
            with self._lock:
                self._running[threading.get_ident()] = message

    def after_process_message(self, broker: Any, message: Any, **kwargs: Any) -> None:
        thread_id = threading.get_ident()
        # Only this thread adds its own entry, so a look without the lock is enough to
        # skip the lock for the (many) messages that did not opt in.
        if thread_id in self._running:
            with self._lock:
                self._running.pop(thread_id, None)

    after_skip_message = after_process_message  # type: ignore[assignment]

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        with self._lock:
            for thread_id in list(self._running):
                interrupt(thread_id, Shutdown)
