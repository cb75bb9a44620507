"""AgeLimit: dead-letter messages that waited longer than ``max_age`` ms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import SkipMessage
from ..message import current_millis
from .base import Middleware, is_milliseconds, option_error


class AgeLimit(Middleware):
    """Actor option ``max_age``: ms, a number >= 0, counted from the send; ``0`` or
    ``None`` (the default) means no limit."""

    actor_options = frozenset({"max_age"})

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        value = options.get("max_age")
        if value is not None and not is_milliseconds(value):
            raise option_error("max_age", value, "a number of milliseconds >= 0 (0 or None: no limit)")

    def before_process_message(self, broker: Any, message: Any) -> None:
        msg = message.message  # read the fields directly, not through the proxy
        max_age = msg.options.get("max_age") or broker.actors[msg.actor_name].options.get("max_age")
        if not max_age:
            return
        age = current_millis() - msg.message_timestamp
        if age > max_age:
            message.fail(f"message is {age} ms old, over the actor's max_age of {max_age} ms")
            raise SkipMessage("message is too old")
