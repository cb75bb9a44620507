"""DeadLetters: write a DeadLetter row for every message that fails for good."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from django.db import connections, router

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
            "queue_name": message.queue_name[:100],
            "actor_name": message.actor_name[:255],
            "message": data,
            "raw_payload": raw,
            "args": list(message.args),
            "kwargs": message.kwargs,
            "options": message.options,
            "exception_type": exception_type[:255],
            "exception_message": exception_message,
            "traceback": message.traceback or "",
            "retries": retries,
            "enqueued_at": enqueued_at,
            "status": DeadLetter.Status.DEAD,
        }
        if connections[router.db_for_write(DeadLetter)].vendor == "postgresql":
            # PostgreSQL stores no NUL character, in text or in jsonb: a payload or an
            # argument holding one must not cost the message its dead letter.
            fields = {key: _without_nul(value) for key, value in fields.items()}
        DeadLetter.objects.update_or_create(message_id=message.message_id, defaults=fields)
        message.dead_lettered = True


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value
