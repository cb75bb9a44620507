"""Database routers the tests switch on with ``settings.DATABASE_ROUTERS``."""

from __future__ import annotations

from typing import Any

from djqueue.models import DeadLetter


class DeadLettersOnPostgres:
    """Routes DeadLetter rows to PostgreSQL (the suite's default database is SQLite)."""

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "postgres" if model is DeadLetter else None

    db_for_read = db_for_write
