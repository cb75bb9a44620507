"""The results backend interface: where return values and final failures are kept.

A backend stores one result per message id, for ``ttl`` milliseconds, and lets a
caller wait for it. The database backend (``RESULT_BACKEND = "db"``) keeps results
as ``TaskResult`` rows; the Redis backend (a ``redis://`` URL) as keys that expire on
their own. Callers use only this interface.

A stored result is either the actor's return value (JSON) or a failure: the type and
message of the exception that made the message fail for good. ``get_result`` returns
the former and raises ``ResultFailure`` for the latter.

Groups with completion callbacks are counted here too, because the count must agree
with the stored results: a member counts as completed once its success is stored,
whatever the number of times it ran (a message is delivered at least once), and the
callbacks of a complete group are enqueued by exactly one worker (``run_once``).

All times are in milliseconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ResultFailure, ResultMissing, ResultTimeout

DEFAULT_TIMEOUT = 10_000
# Waiting by polling starts fast, so short jobs return quickly, and slows down to
# POLL_MAX so that a long wait asks the database at most a few times a second.
POLL_MIN = 50
POLL_MAX = 250

SUCCEEDED = "succeeded"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StoredResult:
    """One message's outcome, as a backend keeps it."""

    status: str
    value: Any = None
    exception_type: str = ""
    exception_message: str = ""

    def unwrap(self, message_id: str) -> Any:
        """The return value, or ResultFailure if the message failed for good."""
        if self.status == FAILED:
            raise ResultFailure(
                f"message {message_id} failed: {self.exception_type}: {self.exception_message}",
                self.exception_type,
                self.exception_message,
            )
        return self.value

    def to_json(self) -> str:
        if self.status == FAILED:
            return json.dumps(
                {"status": FAILED, "type": self.exception_type, "message": self.exception_message}
            )
        return json.dumps({"status": SUCCEEDED, "value": self.value})

    @classmethod
    def from_json(cls, data: str | bytes) -> StoredResult:
        value = json.loads(data)
        if value["status"] == FAILED:
            return cls(FAILED, None, value.get("type", ""), value.get("message", ""))
        return cls(SUCCEEDED, value.get("value"))


def check_serializable(value: Any) -> str | None:
    """Why ``value`` cannot be stored as a result, or None if it can (plain JSON only,
    so that both backends return the same thing)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        return f"the return value is not JSON serializable: {e}"
    return None


def _why_no_result(message: Any) -> str:
    """What to say when no result came in time. Not a reason to fail early: the worker's
    actor decides whether a result is stored, and a producer may not register the actor
    at all, or run another version of it."""
    store = getattr(message, "options", {}).get("store_results")
    if store is None and hasattr(message, "actor_name"):
        try:
            from ..brokers import get_broker

            actor = get_broker().actors.get(message.actor_name)
        except Exception:  # no broker can be built here: say what may be wrong
            actor = None
        if actor is not None:
            store = bool(actor.options.get("store_results"))
    if store is None:  # a bare message id, or an actor this process does not know
        return (
            "it has not finished (is a worker consuming its queue?), or its actor does not "
            "have store_results=True, so that no result is ever stored"
        )
    if store:
        return f"it has not finished: is a worker consuming queue {message.queue_name!r}?"
    return (
        f"its actor {message.actor_name} does not have store_results=True, so no result is "
        "stored: declare @actor(store_results=True), or send with send_with_options(store_results=True)"
    )


class ResultBackend:
    """Stores and returns results.

    Methods subclasses must implement: ``_get``, ``_store``, ``count_group_completed``,
    ``run_once`` and ``purge_expired``. ``_wait`` polls ``_get``; a backend that can be
    notified (Redis) overrides it.
    """

    def __init__(self, *, ttl: int) -> None:
        self.ttl = ttl

    # -- public API -----------------------------------------------------------------

    def get_result(self, message: Any, *, block: bool = False, timeout: int | None = None) -> Any:
        """The return value of ``message`` (a Message or a message id).

        With ``block=True``, waits up to ``timeout`` ms (default 10,000). Raises
        ResultMissing (nothing stored and not blocking), ResultTimeout (nothing stored
        in time) or ResultFailure (the message failed for good).
        """
        message_id = getattr(message, "message_id", message)
        stored = self._get(message_id)
        if stored is None:
            if not block:
                raise ResultMissing(
                    f"no result is stored for message {message_id}: it has not finished, its actor "
                    "does not have store_results=True, or the result expired (DJQUEUE['RESULT_TTL'])"
                )
            timeout = DEFAULT_TIMEOUT if timeout is None else int(timeout)
            stored = self._wait(message_id, timeout)
            if stored is None:
                raise ResultTimeout(
                    f"no result for message {message_id} within {timeout} ms: {_why_no_result(message)}"
                )
        return stored.unwrap(message_id)

    def store_result(self, message: Any, value: Any, *, ttl: int | None = None) -> None:
        """Keep ``value``, the return value of ``message``, for ``ttl`` ms."""
        self._store(message, StoredResult(SUCCEEDED, value), self.ttl if ttl is None else ttl)

    def store_failure(
        self, message: Any, exception_type: str, exception_message: str, *, ttl: int | None = None
    ) -> None:
        """Record that ``message`` failed for good, for ``ttl`` ms."""
        stored = StoredResult(FAILED, None, exception_type, exception_message)
        self._store(message, stored, self.ttl if ttl is None else ttl)

    def wait_all(self, message_ids: list[str], *, timeout: int) -> list[StoredResult | None]:
        """Wait up to ``timeout`` ms in all for every id; None for those still missing."""
        deadline = time.monotonic() + timeout / 1000
        results: list[StoredResult | None] = []
        for message_id in message_ids:
            stored = self._get(message_id)
            if stored is None:
                remaining = max(0, int((deadline - time.monotonic()) * 1000))
                stored = self._wait(message_id, remaining) if remaining else None
            results.append(stored)
        return results

    # -- what backends implement ----------------------------------------------------

    def _get(self, message_id: str) -> StoredResult | None:
        """The stored result of ``message_id``, or None (none, or expired)."""
        raise NotImplementedError("subclasses of ResultBackend must implement _get()")

    def _store(self, message: Any, stored: StoredResult, ttl: int) -> None:
        """Keep ``stored`` under ``message.message_id`` for ``ttl`` ms, replacing any
        earlier one. When ``message.options`` has a ``group_id``, a success also makes
        the message count as a completed member of that group."""
        raise NotImplementedError("subclasses of ResultBackend must implement _store()")

    def _wait(self, message_id: str, timeout: int) -> StoredResult | None:
        """Wait up to ``timeout`` ms for a result; None if none arrived."""
        deadline = time.monotonic() + timeout / 1000
        interval = POLL_MIN
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(interval / 1000, remaining))
            stored = self._get(message_id)
            if stored is not None:
                return stored
            interval = min(interval * 1.5, POLL_MAX)

    def count_group_completed(self, group_id: str) -> int:
        """How many distinct members of the group have a stored success."""
        raise NotImplementedError("subclasses of ResultBackend must implement count_group_completed()")

    def run_once(self, key: str, ttl: int, fn: Callable[[], Any]) -> bool:
        """Call ``fn`` unless ``key`` was claimed in the last ``ttl`` ms; True if called.

        Among concurrent callers exactly one claims the key. If ``fn`` raises, the claim
        is released so that a redelivery of the message can try again.
        """
        raise NotImplementedError("subclasses of ResultBackend must implement run_once()")

    def purge_expired(self, *, batch_size: int = 1000) -> int:
        """Delete expired results in batches of ``batch_size``; returns how many."""
        raise NotImplementedError("subclasses of ResultBackend must implement purge_expired()")

    def close(self) -> None:
        """Release connections."""
