"""DeadLetters: write a DeadLetter row for every message that fails for good."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from typing import Any

from django.db import DatabaseError, connections, router

from .base import Middleware

logger = logging.getLogger("djqueue.dead_letters")


def exception_fields(message: Any) -> tuple[str, str]:
    """(exception type, exception message) for a failed message, for rows and results."""
    exception = message.exception
    if message.decode_error is not None:
        return "DecodeError", message.reason or str(message.decode_error)
    if exception is None:
        kind = "UnknownActor" if message.reason and message.reason.startswith("unknown actor") else "Failed"
        return kind, message.reason or ""
    if message.reason and message.reason.startswith("arguments do not match"):
        return "ArgumentsMismatch", message.reason
    return type(exception).__qualname__, str(exception)


class DeadLetters(Middleware):
    """Runs before the broker's nack, so a row exists before the message leaves the
    queue; if the process dies in between, redelivery updates the same row."""

    def before_nack(self, broker: Any, message: Any) -> None:
        from ..models import DeadLetter

        exception_type, exception_message = exception_fields(message)
        data = message.message.asdict()
        raw = ""
        if message.decode_error is not None and message.data is not None:
            raw = bytes(message.data).decode("utf-8", errors="replace")
            data = {}
        if message.reason and message.exception is not None and message.reason not in exception_message:
            exception_message = (
                f"{exception_message}\n({message.reason})" if exception_message else message.reason
            )
        try:
            retries = message.retries
        except (TypeError, ValueError):  # a junk "retries" option must not lose the row
            retries = 0
        timestamp = message.message.message_timestamp
        try:
            enqueued_at = dt.datetime.fromtimestamp(timestamp / 1000, tz=dt.UTC) if timestamp else None
        except (OverflowError, OSError, ValueError):  # a producer's nonsense timestamp
            enqueued_at = None
        fields = {
            "queue_name": _text(message.queue_name)[:100],
            "actor_name": _text(message.actor_name)[:255],
            "message": data,
            "raw_payload": raw,
            "args": list(message.args),
            "kwargs": message.kwargs,
            "options": message.options,
            "exception_type": _text(exception_type)[:255],
            "exception_message": _text(exception_message),
            "traceback": _text(message.traceback or ""),
            "retries": retries,
            "enqueued_at": enqueued_at,
            "status": DeadLetter.Status.DEAD,
        }
        if not raw:
            try:
                problem = _unstorable(data, "")
            except RecursionError:  # json reads deeper nesting than Python recurses in a thread
                problem = "is nested too deeply to store as JSON"
            if problem is not None:
                fields.update(_as_raw(data))
                fields["exception_message"] += f"\n(kept as its raw payload: the message {problem})"
        postgres = connections[router.db_for_write(DeadLetter)].vendor == "postgresql"
        if postgres:
            # PostgreSQL stores no NUL character, in text or in jsonb: a payload or an
            # argument holding one must not cost the message its dead letter.
            fields = {key: _without_nul(value) for key, value in fields.items()}
        try:
            DeadLetter.objects.update_or_create(message_id=message.message_id, defaults=fields)
        except (DatabaseError, ValueError, RecursionError) as e:
            if fields["raw_payload"]:
                raise
            # What a database refuses that _unstorable did not foresee: the row still
            # tells the operator what arrived and why it failed.
            logger.warning(
                "the dead letter of %s could not be stored as JSON (%s); storing its raw payload",
                message.message_id,
                type(e).__name__,
            )
            fields.update(_as_raw(data))
            fields["exception_message"] += f"\n(kept as its raw payload: {type(e).__name__}: {e})"
            if postgres:
                fields = {key: _without_nul(value) for key, value in fields.items()}
            DeadLetter.objects.update_or_create(message_id=message.message_id, defaults=fields)
        message.dead_lettered = True


def _text(value: str) -> str:
    """``value`` without lone surrogates (json reads them from a \\udXXX escape), which no
    database driver encodes; they are kept as that escape."""
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _unstorable(value: Any, where: str) -> str | None:
    """What in ``value`` a JSON column cannot hold, or None: a float JSON has no value for
    (json reads NaN and Infinity, which an older producer may write) or a lone surrogate
    (which PostgreSQL's jsonb refuses)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"holds {value!r} at {where or 'its top'}"
    if isinstance(value, str):
        return None if _text(value) == value else f"holds a lone surrogate at {where or 'its top'}"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _text(key) != key:
                return f"holds a lone surrogate in a key at {where or 'its top'}"
            problem = _unstorable(item, f"{where}[{key!r}]" if where else str(key))
            if problem is not None:
                return problem
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _unstorable(item, f"{where}[{index}]")
            if problem is not None:
                return problem
    return None


def _as_raw(data: dict[str, Any]) -> dict[str, Any]:
    """The row's JSON columns emptied and the message kept as text: what a malformed
    payload's row holds (nothing to re-send, which djqueue could not send anyway)."""
    try:
        raw = json.dumps(data, default=repr)  # ASCII: every escape and Infinity kept as written
    except (ValueError, RecursionError):
        try:
            raw = repr(data)
        except RecursionError:
            raw = "(the message is nested too deeply to show)"
    return {"message": {}, "raw_payload": _text(raw), "args": [], "kwargs": {}, "options": {}}


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value
