"""DbConnections: treat every message like a request for Django's database connections."""

from __future__ import annotations

import threading
from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created

from .base import Middleware

_local = threading.local()


def _connected(sender: Any, connection: Any, **kwargs: Any) -> None:
    # Sent in the thread that opened the connection.
    _local.connected = True


connection_created.connect(_connected, dispatch_uid="djqueue.db_connections.connected")


def close_old_connections() -> None:
    """Django's ``close_old_connections()``, skipped in a thread with no open connection.

    Looking a thread's connections up costs more than most hooks; a worker whose actors
    never touch the database need not pay for it twice per message.
    """
    connected = getattr(_local, "connected", None)
    if connected is False:
        return
    # None: the first look in this thread, which may have connected before we listened.
    still_open = False
    for connection in connections.all(initialized_only=True):
        connection.close_if_unusable_or_obsolete()
        if connection.connection is not None:
            still_open = True
    _local.connected = still_open


class DbConnections(Middleware):
    """Closes stale connections before each message and after it is settled (as
    Django does around a request, honouring CONN_MAX_AGE), and every connection of a
    thread when it stops."""

    def before_process_message(self, broker: Any, message: Any) -> None:
        close_old_connections()

    def after_ack(self, broker: Any, message: Any) -> None:
        close_old_connections()

    after_nack = after_ack  # type: ignore[assignment]

    def before_worker_thread_shutdown(self, broker: Any, thread: Any) -> None:
        connections.close_all()

    before_consumer_thread_shutdown = before_worker_thread_shutdown  # type: ignore[assignment]
