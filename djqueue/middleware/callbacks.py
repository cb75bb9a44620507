"""Callbacks: ``on_success`` / ``on_failure`` actors, and group completion callbacks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..message import Message
from .base import Middleware, option_error
from .dead_letters import exception_fields

logger = logging.getLogger("djqueue.callbacks")


class Callbacks(Middleware):
    """Actor options ``on_success`` and ``on_failure`` name an actor (or are one).

    On success it is sent ``(message_data, result)``; when the message fails for good
    (it is dead-lettered) ``(message_data, {"type": ..., "message": ...})``, as in
    Dramatiq. A message sent by ``group.run()`` for a group with completion callbacks
    counts toward its group on success; the worker that completes the group enqueues
    the callbacks, exactly once (see ResultBackend.run_once).
    """

    actor_options = frozenset({"on_success", "on_failure"})

    def validate_actor_options(self, actor_name: str, options: Mapping[str, Any]) -> None:
        for name in ("on_success", "on_failure"):
            value = options.get(name)
            if value is None:
                continue
            callback = getattr(value, "actor_name", value)
            if not isinstance(callback, str) or not callback:
                # Whether the name is registered is checked when a worker boots: the
                # callback's module may be imported after this one.
                hint = " (decorate the function with @actor)" if callable(value) else ""
                raise option_error(name, value, f"an actor or an actor's name{hint}")

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        from .results import Results

        for actor in broker.actors.values():
            for name in ("on_success", "on_failure"):
                callback = getattr(actor.options.get(name), "actor_name", actor.options.get(name))
                if callback and broker.get_actor(callback) is None:
                    logger.error("%s=%r of %s names no registered actor", name, callback, actor.actor_name)
        if broker.get_middleware(Results) is None:
            logger.warning(
                "the Results middleware is not installed: group completion callbacks will never fire "
                "and pipeline/group results cannot be read"
            )

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is not None or message.failed:
            return
        msg = message.message
        callback = _option(broker, msg, "on_success")
        if callback:
            _send(broker, callback, message, result)
        if msg.options.get("group_id"):
            complete_group_member(broker, message)

    def after_nack(self, broker: Any, message: Any) -> None:
        callback = _option(broker, message.message, "on_failure")
        if callback:
            exception_type, exception_message = exception_fields(message)
            _send(broker, callback, message, {"type": exception_type, "message": exception_message})


def _option(broker: Any, message: Message, name: str) -> str | None:
    value = message.options.get(name)
    if value is None:
        actor = broker.actors.get(message.actor_name)
        value = actor.options.get(name) if actor is not None else None
    return getattr(value, "actor_name", value)


def _send(broker: Any, actor_name: str, message: Any, payload: Any) -> None:
    actor = broker.get_actor(actor_name)
    if actor is None:
        logger.error("callback actor %r of %s is not registered", actor_name, message.actor_name)
        return
    actor.send(message.message.asdict(), payload)


def complete_group_member(broker: Any, message: Any) -> None:
    """Enqueue the group's completion callbacks if ``message`` was its last member.

    Its success is already stored (Results runs first): the group is complete when as
    many distinct members succeeded as it has, and run_once makes one worker, even
    among several that see the full count at the same moment, enqueue the callbacks.
    """
    from ..results import get_result_backend

    options = message.options
    group_id = options["group_id"]
    backend = get_result_backend()
    if backend.count_group_completed(group_id) < int(options.get("group_size", 0)):
        return
    callbacks = [Message.from_dict(data) for data in options.get("group_callbacks") or ()]
    if backend.run_once(f"group:{group_id}", backend.ttl, lambda: broker.enqueue_many(callbacks)):
        logger.info("group %s completed; enqueued %d callback(s)", group_id, len(callbacks))
