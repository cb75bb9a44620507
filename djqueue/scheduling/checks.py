"""System checks for ``DJQUEUE["CRONTABS"]``, registered when this module is imported.

Each error names the entry (and key) at fault. Ids are stable (docs/scheduling.md):

- djqueue.E010 an entry is not a dict, or its name is not a non-empty string of <= 200 characters
- djqueue.E011 an entry has an unknown key
- djqueue.E012 ``schedule`` is missing, malformed, or never fires
- djqueue.E013 ``actor`` is missing or names no actor
- djqueue.E014 ``timezone`` is not a known time zone
- djqueue.E015 ``args``/``kwargs`` have the wrong type, cannot be encoded, or do not fit the actor
- djqueue.E016 ``queue_name`` is not a valid queue name
- djqueue.E017 ``catch_up`` is not ``"latest"`` or ``"skip"``
- djqueue.E018 ``enabled`` is not True or False
- djqueue.E019 the broker refuses the entry's ``queue_name``, so no worker would consume it
- djqueue.W005 ``schedule`` has a sixth field of ``*``: it fires every second
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register

from .. import conf
from .crontab import describe_key, entry_problems
from .queues import declare_crontab_queues

IDS = {
    "name": "djqueue.E010",
    "entry": "djqueue.E010",
    "keys": "djqueue.E011",
    "schedule": "djqueue.E012",
    "actor": "djqueue.E013",
    "timezone": "djqueue.E014",
    "args": "djqueue.E015",
    "kwargs": "djqueue.E015",
    "queue_name": "djqueue.E016",
    "catch_up": "djqueue.E017",
    "enabled": "djqueue.E018",
}

QUEUE_REFUSED = "djqueue.E019"
EVERY_SECOND = "djqueue.W005"


@register(Tags.compatibility)
def check_crontabs(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    crontabs = conf.get("CRONTABS")
    if not isinstance(crontabs, Mapping):
        return []  # djqueue.E004 reports it
    from .scheduler import default_timezone

    errors: list[CheckMessage] = []
    for name, value in crontabs.items():
        problems = entry_problems(name, value, default_timezone=default_timezone())
        for key, message, hint in problems:
            errors.append(Error(f"{describe_key(name, key)} {message}", hint=hint, id=IDS[key]))
        if not any(p.key in ("name", "entry", "actor") for p in problems):
            errors += _check_actor(name, value)
        if not any(p.key in ("name", "entry", "queue_name") for p in problems):
            errors += _check_queue(name, value)
        if not any(p.key in ("name", "entry", "schedule") for p in problems):
            errors += _check_seconds(name, value)
    return errors


def _check_seconds(name: str, value: Mapping[str, Any]) -> list[CheckMessage]:
    """croniter reads a sixth field as seconds, last; Quartz, node-cron and APScheduler
    read it first, so ``*/10 * * * * *`` (every 10 s there) fires every second here."""
    fields = value["schedule"].split()
    if len(fields) != 6 or fields[5] != "*":
        return []
    return [
        Warning(
            f"{describe_key(name, 'schedule')} {value['schedule']!r} fires every second: a sixth "
            "field is the seconds, and it comes last.",
            hint=f"For seconds first, as Quartz writes them, move them last "
            f"({' '.join([*fields[1:], fields[0]])!r}); for every second write '*/1' there.",
            id=EVERY_SECOND,
        )
    ]


def _check_queue(name: str, value: Mapping[str, Any]) -> list[Error]:
    """The broker must accept (declare) the entry's queue_name: a runworkers started
    without --queues consumes exactly the declared queues (see queues.py)."""
    from ..brokers import get_broker

    if value.get("queue_name") is None:
        return []  # the actor's queue, declared with the actor
    try:
        broker = get_broker()
    except Exception:
        return []  # djqueue.E00x report why the broker cannot be built
    refused = declare_crontab_queues(broker, {name: value})
    return [
        Error(
            f"{describe_key(name, 'queue_name')} names queue {queue_name!r}, which the broker refuses, "
            f"so no worker would consume it: {error}",
            hint="Use a queue the broker accepts (an actor's queue, for instance), or leave "
            "'queue_name' out to use the actor's queue.",
            id=QUEUE_REFUSED,
        )
        for queue_name, error in refused.items()
    ]


def _check_actor(name: str, value: Mapping[str, Any]) -> list[Error]:
    from ..brokers import get_broker
    from ..encoder import get_encoder
    from ..errors import ActorNotFound
    from .scheduler import resolve_actor

    try:
        broker = get_broker()
    except Exception:
        return []  # djqueue.E00x report why the broker cannot be built
    try:
        actor = resolve_actor(value["actor"], broker)
    except ActorNotFound as e:
        return [
            Error(
                f"{describe_key(name, 'actor')} {e}.",
                hint="Give the actor's name (its function's dotted path unless actor_name= says "
                "otherwise) and check that its tasks module is in an installed app.",
                id="djqueue.E013",
            )
        ]
    args, kwargs = value.get("args", ()), value.get("kwargs", {})
    if not isinstance(args, list | tuple) or not isinstance(kwargs, Mapping):
        return []  # reported by entry_problems
    reason = actor.check_arguments(tuple(args), dict(kwargs))
    if reason is None:
        try:
            get_encoder().encode({"args": list(args), "kwargs": dict(kwargs)})
        except Exception as e:
            reason = f"the arguments cannot be encoded: {e}"
    if reason is None:
        return []
    return [
        Error(
            f"{describe_key(name)} has arguments that do not fit: {reason}.",
            hint="Fix 'args' and 'kwargs' so that the actor can be called with them (JSON values only).",
            id="djqueue.E015",
        )
    ]
