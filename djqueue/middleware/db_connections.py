"""DbConnections: treat every message like a request for Django's database connections."""

from __future__ import annotations

from typing import Any

from django.db import close_old_connections, connections

from .base import Middleware


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
