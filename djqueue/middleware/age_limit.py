"""AgeLimit: dead-letter messages that waited longer than ``max_age`` ms."""

from __future__ import annotations

from typing import Any

from ..errors import SkipMessage
from ..message import current_millis
from .base import Middleware


class AgeLimit(Middleware):
    actor_options = frozenset({"max_age"})

    def before_process_message(self, broker: Any, message: Any) -> None:
        msg = message.message  # read the fields directly, not through the proxy
        max_age = msg.options.get("max_age") or broker.actors[msg.actor_name].options.get("max_age")
        if not max_age:
            return
        age = current_millis() - msg.message_timestamp
        if age > max_age:
            message.fail(f"message is {age} ms old, over the actor's max_age of {max_age} ms")
            raise SkipMessage("message is too old")
