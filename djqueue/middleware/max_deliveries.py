"""MaxDeliveries: dead-letter a message whose worker keeps dying while running it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import SkipMessage
from .base import Middleware, is_whole_number, option_error


class MaxDeliveries(Middleware):
    """A message delivered more than ``max_deliveries`` times never finished: each time,
    the process running it died (``os._exit``, the OOM killer, a segfault) before it could
    ack or retry. Retrying it again would take down a worker again, so it is dead-lettered
    with a reason saying so. Actor option ``max_deliveries``; default
    ``DJQUEUE["MAX_DELIVERIES"]`` (5).

    The count comes from the broker (``MessageProxy.delivery_count``), exact on every
    broker; a requeue (graceful shutdown) does not count.
    """

    actor_options = frozenset({"max_deliveries"})

    def __init__(self, *, max_deliveries: int | None = None) -> None:
        if max_deliveries is None:
            from .. import conf

            try:
                max_deliveries = conf.get("MAX_DELIVERIES")
            except Exception:  # settings not configured: a plain library use
                max_deliveries = 5
        self.max_deliveries = max_deliveries

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        value = options.get("max_deliveries")
        if value is not None and not is_whole_number(value, 1):
            raise option_error(
                "max_deliveries", value, f"a whole number >= 1 (None: the default, {self.max_deliveries})"
            )

    def before_process_message(self, broker: Any, message: Any) -> None:
        if message.delivery_count == 1:
            return  # every limit is at least 1
        msg = message.message
        # A message option (a Django task backend's OPTIONS) wins over the actor's.
        limit = msg.options.get("max_deliveries")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            limit = broker.actors[msg.actor_name].options.get("max_deliveries") or self.max_deliveries
        if message.delivery_count > limit:
            message.fail(
                f"delivered {message.delivery_count} times without finishing (more than "
                f"max_deliveries={limit}): the worker process running it died each time"
            )
            raise SkipMessage("too many deliveries")
