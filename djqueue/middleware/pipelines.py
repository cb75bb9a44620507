"""Pipelines: when a message of a pipeline succeeds, enqueue the next one."""

from __future__ import annotations

import logging
from typing import Any

from ..message import Message
from .base import Middleware

logger = logging.getLogger("djqueue.pipelines")


class Pipelines(Middleware):
    """Runs the chain that ``pipeline([...])`` nests in each message's ``pipe_target``
    option: on success the next message is enqueued with the result appended to its
    arguments, unless it has ``pipe_ignore=True``. On failure the chain stops (and the
    Results middleware records the failure for the messages that will not run)."""

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        target = message.message.options.get("pipe_target")
        if not target or exception is not None or message.failed:
            return
        next_message = Message.from_dict(target)
        if not next_message.options.get("pipe_ignore"):
            next_message = next_message.copy(args=(*next_message.args, result))
        try:
            broker.enqueue(next_message)
        except Exception as e:
            # E.g. a result that JSON cannot carry: the chain cannot go on, and whoever
            # waits for its result must learn why rather than time out.
            logger.exception("pipeline stopped after %s: cannot enqueue the next message", message.message_id)
            from .results import fail_rest_of_pipeline

            fail_rest_of_pipeline(broker, target, type(e).__name__, f"the pipeline stopped: {e}")
