"""Results: keep the return value (or final failure) of messages whose result is wanted."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..message import Message
from .base import Middleware, is_whole_number, option_error
from .dead_letters import exception_fields

logger = logging.getLogger("djqueue.results")


class Results(Middleware):
    """Stores a message's result when its actor has ``store_results=True`` (or the
    message has it in its options, as ``group`` and ``pipeline`` set it).

    A success is stored once the actor returned; a failure once the message is
    dead-lettered (``after_nack``), which is when it has failed for good, whatever the
    reason (retries exhausted, ``throws``, ``max_age``, bad arguments). The messages of a
    pipeline that will never run because of it get the same failure, so that
    ``pipeline.get_result()`` fails at once instead of timing out.

    Actor options: ``store_results`` (True or False, default False) and ``result_ttl``
    (a whole number of ms > 0, default ``DJQUEUE["RESULT_TTL"]``).
    """

    actor_options = frozenset({"store_results", "result_ttl"})

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        store = options.get("store_results")
        if store is not None and not isinstance(store, bool):
            raise option_error("store_results", store, "True or False")
        ttl = options.get("result_ttl")
        if ttl is not None and not is_whole_number(ttl, 1):
            raise option_error(
                "result_ttl", ttl, "a whole number of milliseconds > 0 (None: DJQUEUE['RESULT_TTL'])"
            )

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is not None or message.failed:
            return
        store, ttl = _wanted(broker, message.message)
        if not store:
            return
        from ..results import get_result_backend
        from ..results.base import check_serializable

        backend = get_result_backend()
        problem = check_serializable(result)
        if problem is not None:
            logger.error("cannot store the result of %s: %s", message.message_id, problem)
            backend.store_failure(message, "TypeError", problem, ttl=ttl)
            return
        backend.store_result(message, result, ttl=ttl)

    def after_nack(self, broker: Any, message: Any) -> None:
        store, ttl = _wanted(broker, message.message)
        if not store and not message.options.get("pipe_target"):
            return
        exception_type, exception_message = exception_fields(message)
        if store:
            from ..results import get_result_backend

            get_result_backend().store_failure(message, exception_type, exception_message, ttl=ttl)
        fail_rest_of_pipeline(broker, message.options.get("pipe_target"), exception_type, exception_message)


def _wanted(broker: Any, message: Message) -> tuple[bool, int | None]:
    """(whether to store the message's result, its TTL in ms or None for the default)."""
    options = message.options
    actor = broker.actors.get(message.actor_name)
    actor_options = actor.options if actor is not None else {}
    store = options.get("store_results")
    if store is None:
        store = actor_options.get("store_results", False)
    if not store:
        return False, None
    return True, options.get("result_ttl") or actor_options.get("result_ttl")


def fail_rest_of_pipeline(
    broker: Any, target: dict[str, Any] | None, exception_type: str, exception_message: str
) -> None:
    """Store a failure for each later message of a pipeline whose result is wanted:
    the chain stopped, so they will never run."""
    if not target:
        return
    from ..results import get_result_backend

    backend = get_result_backend()
    while target:
        message = Message.from_dict(target)
        store, ttl = _wanted(broker, message)
        if store:
            backend.store_failure(message, exception_type, exception_message, ttl=ttl)
        target = message.options.get("pipe_target")
