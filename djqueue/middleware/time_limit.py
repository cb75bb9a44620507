"""TimeLimit: raise TimeLimitExceeded inside an actor that runs too long."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..errors import TimeLimitExceeded
from ..interrupts import interrupt
from .base import Middleware, is_milliseconds, option_error

logger = logging.getLogger("djqueue.time_limit")

DEFAULT_TIME_LIMIT = 600_000
# A limit under this many ms is more likely seconds written as milliseconds (time_limit=60
# for a minute) than meant. It is logged, not refused, nor a Python warning: tests use
# short limits on purpose, and many run with warnings as errors.
SUSPICIOUS_TIME_LIMIT = 1_000


def raise_in_thread(thread_id: int, exception: type[BaseException]) -> bool:
    """Raise ``exception`` in another thread while it runs an actor (see interrupts.py):
    a time limit is enforced for Python code, not inside C calls."""
    return interrupt(thread_id, exception)


class TimeLimit(Middleware):
    """Actor option ``time_limit``: in **milliseconds**, a number >= 0; ``0`` means no
    limit and ``None`` (or leaving it out) the middleware's default, 10 minutes. One
    monitor thread per process sleeps until the earliest deadline; there is no polling."""

    actor_options = frozenset({"time_limit"})

    def __init__(self, *, time_limit: int = DEFAULT_TIME_LIMIT) -> None:
        self.time_limit = time_limit
        self._deadlines: dict[int, tuple[float, str]] = {}  # thread id -> (deadline, message id)
        self._heap: list[tuple[float, int, str]] = []
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        # When the monitor wakes next (None: not until notified). New deadlines are
        # almost always later than it, so most messages need not wake the monitor.
        self._wake_at: float | None = None
        self._doubted: set[str] = set()  # actors whose short limit was logged

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        value = options.get("time_limit")
        if value is None:
            return
        if not is_milliseconds(value):
            raise option_error(
                "time_limit",
                value,
                f"a number of milliseconds >= 0 (0: no limit; None: the default, {self.time_limit:_} ms)",
            )
        if 0 < value < SUSPICIOUS_TIME_LIMIT and actor_name not in self._doubted:
            # Once per actor: sends that compute their limit must not grow this, nor the log.
            self._doubted.add(actor_name)
            logger.warning(
                "actor %s: time_limit=%s is in milliseconds: the actor is stopped after %s ms; "
                "for %s seconds write time_limit=%s",
                actor_name,
                value,
                value,
                value,
                f"{int(value * 1000):_}",
            )

    def _limit_for(self, broker: Any, message: Any) -> int | None:
        value = message.options.get("time_limit")
        if value is None:
            actor = broker.actors.get(message.actor_name)
            value = actor.options.get("time_limit") if actor is not None else None
        return self.time_limit if value is None else value

    def before_process_message(self, broker: Any, message: Any) -> None:
        msg = message.message  # read the fields directly, not through the proxy
        limit = self._limit_for(broker, msg)
        if not limit:
            return
        deadline = time.monotonic() + limit / 1000
        thread_id = threading.get_ident()
        message_id = msg.message_id
        with self._cond:
            self._deadlines[thread_id] = (deadline, message_id)
            heap = self._heap
            # Entries of finished messages stay in the heap until they are due; drop
            # them when the heap is mostly stale, so it stays small (amortized O(1)).
            if len(heap) > 64 and len(heap) > 4 * len(self._deadlines):
                live = self._deadlines
                heap = self._heap = [(d, t, m) for d, t, m in heap if live.get(t) == (d, m)]
                heapq.heapify(heap)
            heapq.heappush(heap, (deadline, thread_id, message_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._monitor, name="djqueue-time-limit", daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline < self._wake_at:
                self._cond.notify()

    def after_process_message(self, broker: Any, message: Any, **kwargs: Any) -> None:
        with self._cond:
            self._deadlines.pop(threading.get_ident(), None)

    after_skip_message = after_process_message  # type: ignore[assignment]

    def _monitor(self) -> None:
        while True:
            expired = []
            with self._cond:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    deadline, thread_id, message_id = heapq.heappop(self._heap)
                    if self._deadlines.get(thread_id) == (deadline, message_id):
                        del self._deadlines[thread_id]
                        expired.append((thread_id, message_id))
                self._wake_at = self._heap[0][0] if self._heap else None
                if not expired:
                    self._cond.wait(self._wake_at - now if self._wake_at is not None else None)
                    continue
            # Outside the lock: a logging handler may block, and the worker threads arm
            # their deadlines under it. An actor that already returned is not interrupted.
            for thread_id, message_id in expired:
                if interrupt(thread_id, TimeLimitExceeded):
                    logger.warning("message %s exceeded its time limit", message_id)
