"""The queues crontab entries send to are queues of the project, as actors' queues are.

An actor declares its queue on the broker when its module is imported, and every tool
that lists "the project's queues" asks ``broker.get_declared_queues()``: ``runworkers``
without ``--queues`` (in the supervisor and in each worker process), ``queuestats``,
the metrics and the admin dashboard. An entry's ``queue_name`` is declared the same way,
at start-up in every process: ``DjqueueConfig.ready()`` calls ``declare_at_startup()``
once the tasks modules are imported, when ``CRONTABS`` is set. Declaring
goes through ``Broker.declare_queue()`` like an actor's queue, so RabbitMQ creates the
queue with the same arguments when a worker first uses it.

An entry may name its actor by a dotted path into a module that is no tasks module, which
autodiscovery would not import: ``declare_at_startup()`` imports it too, so that every
worker process knows the actor (and consumes its queue), not only the processes that
happened to run the checks or the scheduler.

Declaring makes no connection: it is safe at start-up, when the broker may be down.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import conf
from ..brokers.base import validate_queue_name
from ..errors import ConfigurationError
from .crontab import MAX_NAME_LENGTH

if TYPE_CHECKING:
    from ..brokers.base import Broker

logger = logging.getLogger("djqueue.scheduler")


def crontab_queue_names(crontabs: Any) -> list[str]:
    """The ``queue_name`` of the entries of a CRONTABS setting, sorted, each once.

    Disabled entries count too (a tick enqueued before the entry was disabled still
    runs). Entries without ``queue_name`` send to their actor's queue, which the actor
    declares itself; an invalid entry or name is skipped (djqueue.E010/E016 report it).
    """
    if not isinstance(crontabs, Mapping):
        return []
    names: set[str] = set()
    for name, value in crontabs.items():
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
            continue
        if not isinstance(value, Mapping) or value.get("queue_name") is None:
            continue
        try:
            names.add(validate_queue_name(value["queue_name"]))
        except ConfigurationError:
            continue
    return sorted(names)


def declare_crontab_queues(broker: Broker | None = None, crontabs: Any = None) -> dict[str, Exception]:
    """Declare the queues of ``crontabs`` (default: the CRONTABS setting) on ``broker``
    (default: the current one). Returns the queues the broker refused, with its error
    (a middleware's ``before_declare_queue`` may refuse one; djqueue.E019 reports it)."""
    from ..brokers import get_broker

    broker = broker or get_broker()
    refused: dict[str, Exception] = {}
    for queue_name in crontab_queue_names(conf.get("CRONTABS") if crontabs is None else crontabs):
        try:
            broker.declare_queue(queue_name)
        except Exception as e:
            refused[queue_name] = e
    return refused


def import_crontab_actors(broker: Broker, crontabs: Any) -> None:
    """Import the actor of every entry of ``crontabs`` that names one by dotted path; an
    entry whose actor cannot be found is left for djqueue.E013 to report."""
    from .scheduler import resolve_actor

    if not isinstance(crontabs, Mapping):
        return
    for value in crontabs.values():
        actor_name = value.get("actor") if isinstance(value, Mapping) else None
        if not isinstance(actor_name, str) or "." not in actor_name or broker.get_actor(actor_name):
            continue
        try:
            resolve_actor(actor_name, broker)
        except Exception as e:  # whatever the module raises: the checks report it
            logger.debug("crontab actor %r not imported: %s", actor_name, e)


def declare_at_startup() -> None:
    """``import_crontab_actors()`` and ``declare_crontab_queues()`` for
    ``DjqueueConfig.ready()``; never raises.

    A broker that cannot be built is left for ``ready()`` to record and for the
    djqueue.E00x checks to report; a refused queue is reported by djqueue.E019.
    """
    from ..brokers import get_broker

    try:
        import_crontab_actors(get_broker(), conf.get("CRONTABS"))
        refused = declare_crontab_queues()
    except Exception as e:
        logger.debug("crontab queues not declared: %s", e)
        return
    for queue_name, error in refused.items():
        logger.debug("crontab queue %r not declared: %s", queue_name, error)
