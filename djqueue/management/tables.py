"""Whether djqueue's tables exist, asked once before a long-running command starts.

Without them a worker only repeats "no such table" on every poll and heartbeat; the
command stops instead and says to run ``migrate``.
"""

from __future__ import annotations

from typing import Any

from django.db import DatabaseError, connections, router

# What every worker process writes, wherever the router sends it.
WORKER_MODELS = ("DeadLetter", "WorkerHeartbeat", "ThroughputMinute")


def missing_tables(broker: Any, model_names: tuple[str, ...]) -> str | None:
    """Why the command cannot start (a table is missing), or None. The database broker's
    own table is looked for in its database. A database that does not answer is not
    reported here: the workers keep trying to reach it."""
    from django.apps import apps

    from ..brokers.database import DatabaseBroker

    wanted: dict[str, set[str]] = {}
    for name in model_names:
        model = apps.get_model("djqueue", name)
        wanted.setdefault(router.db_for_write(model), set()).add(model._meta.db_table)
    if isinstance(broker, DatabaseBroker):
        wanted.setdefault(broker.alias, set()).add(apps.get_model("djqueue", "QueuedMessage")._meta.db_table)
    for alias, tables in sorted(wanted.items()):
        try:
            with connections[alias].cursor() as cursor:
                present = set(connections[alias].introspection.table_names(cursor))
        except DatabaseError:
            continue
        finally:
            connections[alias].close()  # not carried into the forked worker processes
        missing = sorted(tables - present)
        if missing:
            command = "python manage.py migrate" + ("" if alias == "default" else f" --database {alias}")
            return (
                f"database {alias!r} has no table {', '.join(missing)}: djqueue's migrations are "
                f"not applied there. Run `{command}` first."
            )
    return None
