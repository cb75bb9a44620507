"""CurrentMessage: lets an actor see the message it is running for."""

from __future__ import annotations

import threading
from typing import Any

from .base import Middleware

_local = threading.local()


class CurrentMessage(Middleware):
    """``CurrentMessage.get_current_message()`` inside an actor returns its message."""

    @staticmethod
    def get_current_message() -> Any:
        return getattr(_local, "message", None)

    def before_process_message(self, broker: Any, message: Any) -> None:
        _local.message = message

    def after_process_message(self, broker: Any, message: Any, **kwargs: Any) -> None:
        _local.message = None

    after_skip_message = after_process_message  # type: ignore[assignment]


def get_current_message() -> Any:
    """The message whose actor is running in this thread, or None."""
    return CurrentMessage.get_current_message()
