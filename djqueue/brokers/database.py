"""The database broker (``db://ALIAS``): queues as rows of a Django database.

One table, ``djqueue_queuedmessage``. A row's ``available_at`` (ms) is its eta while it
waits and the end of its lease while a consumer holds it, so one indexed range scan
(``available_at <= now``, by priority, then age) finds new, due and abandoned messages
alike. A claim sets ``lease_owner`` and ``available_at = now + lease`` and counts a
delivery; a heartbeat renews the leases of held rows every ``lease / 3``; ack and nack
delete the row; requeue clears the lease.

PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` in one statement and wakes idle
consumers with LISTEN/NOTIFY; SQLite claims in a short ``BEGIN IMMEDIATE`` transaction,
and an idle consumer reads SQLite's change counter every few ms and looks in full every
``poll_interval`` ms. Enqueueing uses the thread's own Django connection, so a message
sent inside ``transaction.atomic()`` is rolled back with it; consumers use connections
of their own.

This module is the broker and its sending side; the SQL is in database_sql.py, the
consumer in database_consumer.py, the maintenance and LISTEN threads in
database_threads.py. User documentation: docs/database-broker.md.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction

from ..errors import ConfigurationError, ConnectionError
from ..message import Message, current_millis
from . import mask_url
from .base import Broker, Consumer, QueueStats, refuse_unknown_options
from .database_consumer import DatabaseConsumer
from .database_sql import Statements, is_locked
from .database_threads import Listener, Maintenance, Watchdog

logger = logging.getLogger("djqueue.broker.database")

VENDORS = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}

T = TypeVar("T")


class DatabaseBroker(Broker):
    """Messages as rows of the Django database ``alias``; ``db://ALIAS`` in DJQUEUE["BROKER_URL"].

    Options (times in ms): ``lease`` (30,000), how long a claimed message stays hidden
    from other consumers without a heartbeat (renewed every lease/3); ``poll_interval``
    (100), how often an idle consumer looks for work on SQLite, or on PostgreSQL with
    ``listen=False``; ``listen`` (True), wake idle PostgreSQL consumers by LISTEN/NOTIFY.
    """

    scheme = "db"
    supports_transactions = True

    def __init__(
        self,
        middleware: Any = None,
        *,
        alias: str = "default",
        lease: int = 30_000,
        poll_interval: int = 100,
        listen: bool = True,
        **kwargs: Any,
    ) -> None:
        refuse_unknown_options("database", DatabaseBroker.__init__, kwargs, from_url=["alias"])
        _check_alias(alias)
        for name, value in (("lease", lease), ("poll_interval", poll_interval)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(f"the database broker's {name} must be a positive int (ms)")
        self.alias = alias
        self.vendor: str = connections[alias].vendor
        self.lease = lease
        self.poll_interval = poll_interval
        self.listen = bool(listen) and self.vendor == "postgresql" and _has_psycopg()
        # Consumers prepare their claims (with LISTEN on), until the server loses one;
        # read by every claim, so that all of them stop at once.
        self.prepare_claims = True
        self.sql = Statements(self.vendor)
        self._lock = threading.Lock()
        self._consumers: set[DatabaseConsumer] = set()
        self._maintenance: Maintenance | None = None
        self._listener: Listener | None = None
        self._watchdog: Watchdog | None = None
        super().__init__(middleware, **kwargs)

    @property
    def keeps_dead_letters(self) -> bool:
        """Whether failed messages are kept as DeadLetter rows (the DeadLetters middleware):
        this broker has no dead-letter store of its own."""
        from ..middleware.dead_letters import DeadLetters

        return any(isinstance(m, DeadLetters) for m in self.middleware)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DatabaseBroker:
        return cls(alias=_parse_alias(url), **options)

    @classmethod
    def check_url(cls, url: str) -> None:
        _check_alias(_parse_alias(url))

    def describe(self) -> str:
        settings = connections[self.alias].settings_dict
        where = str(settings.get("NAME") or "")
        if self.vendor == "postgresql":
            where = (
                f"database {where} on {settings.get('HOST') or 'localhost'}:{settings.get('PORT') or 5432}"
            )
        return f"db://{self.alias} ({VENDORS[self.vendor]} {where})"

    # -- sending ------------------------------------------------------------------

    def _declare_queue(self, queue_name: str) -> None:
        pass  # a queue is a value of the queue_name column

    def _enqueue(self, message: Message, data: bytes) -> None:
        self._insert([(message.queue_name, message.message_id, message.priority, message.eta, data)])

    def _enqueue_many(self, prepared: list[tuple[Message, bytes]]) -> None:
        self._insert([(m.queue_name, m.message_id, m.priority, m.eta, data) for m, data in prepared])

    def enqueue_raw(self, queue_name: str, data: bytes) -> None:
        """Put arbitrary bytes on a queue, as a misbehaving producer would (for tests)."""
        self.declare_queue(queue_name)
        self._insert([(queue_name, "", 0, None, data)])

    def _insert(self, rows: list[tuple[str, str, int, int | None, bytes]]) -> None:
        # The thread's own connection: inside transaction.atomic() the rows, and the
        # NOTIFY that PostgreSQL delivers at commit, are rolled back with it.
        if not rows:
            return
        now = current_millis()
        values = [
            (q, mid, pri, now if eta is None else int(eta), data, now) for q, mid, pri, eta, data in rows
        ]
        queues = sorted({row[0] for row in rows})
        statements = self.sql.insert(values, queues)

        def write(connection: Any) -> None:
            if len(statements) > 1:
                # All or nothing: a batch repeated on a new connection (below) is
                # never stored in part.
                with transaction.atomic(using=self.alias):
                    _write(connection, statements)
            else:
                _write(connection, statements)

        # At least once: if the first try's commit was lost with its reply, the
        # messages are there twice.
        _once_more_if_lost(self.alias, "enqueue", write)
        if not self.listen:  # wake this process's consumers at once (after commit)
            for queue_name in queues:
                transaction.on_commit(partial(self.wake, queue_name), using=self.alias)

    # -- consuming ----------------------------------------------------------------

    def consume(self, queue_name: str, *, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        self.declare_queue(queue_name)
        consumer = DatabaseConsumer(self, queue_name, prefetch, timeout)
        with self._lock:
            self._consumers.add(consumer)
            if self._maintenance is None:
                self._maintenance = Maintenance(self)
                self._maintenance.start()
            if self.listen and self._listener is None:
                self._listener = Listener(self)
                self._listener.start()
            if self.vendor == "postgresql" and self._watchdog is None:
                self._watchdog = Watchdog(self)
                self._watchdog.start()
        return consumer

    def consumers(self) -> list[DatabaseConsumer]:
        with self._lock:
            return list(self._consumers)

    def wake(self, queue_name: str | None = None) -> None:
        """Make this process's idle consumers of ``queue_name`` (None: all) look for work."""
        for consumer in self.consumers():
            if queue_name is None or consumer.queue_name == queue_name:
                consumer.wake()

    def _forget(self, consumer: DatabaseConsumer) -> None:
        with self._lock:
            self._consumers.discard(consumer)
            if self._consumers:
                return
            threads = [self._maintenance, self._listener, self._watchdog]
            self._maintenance = self._listener = self._watchdog = None
        for thread in threads:
            if thread is not None:
                thread.stop()

    # -- inspecting ---------------------------------------------------------------

    def get_queue_stats(self, queue_name: str) -> QueueStats:
        from ..models import DeadLetter

        # Buffered acks are finished work: delete them first, so callers see their acks.
        for consumer in self.consumers():
            if consumer.queue_name == queue_name:
                consumer.flush_acks()
        now = current_millis()
        with _reaching(self.alias, "count messages"), connections[self.alias].cursor() as cursor:
            cursor.execute(self.sql.stats, [now, now, now, queue_name])
            ready, delayed, in_flight = (int(n or 0) for n in cursor.fetchone())
        # Dead letters are DeadLetter rows, wherever the router puts them.
        dead = DeadLetter.objects.dead().filter(queue_name=queue_name).count()
        return QueueStats(ready, delayed, in_flight, dead)

    def purge(self, queue_name: str) -> None:
        self._change("purge", self.sql.purge, [queue_name, current_millis()])

    def cancel(self, message_id: str, *, queue_name: str | None = None) -> bool:
        # True is certain. False after a repeat is not quite: if the first try's commit
        # was lost with its reply, that try removed the message and the repeat finds
        # nothing (docs/database-broker.md, "Connections"); a table of cancelled ids,
        # like Redis's markers, would be the price of telling.
        return self._change("cancel", *self.sql.cancel(message_id, queue_name, current_millis())) > 0

    def _change(self, what: str, sql: str, params: list[Any]) -> int:
        """Run one statement on the thread's connection, as a send does; the rows it changed."""
        return _once_more_if_lost(self.alias, what, lambda connection: _write(connection, [(sql, params)]))

    def close(self) -> None:
        for consumer in self.consumers():
            consumer.close()


def _write(connection: Any, statements: list[tuple[str, list[Any]]]) -> int:
    """Run ``statements`` on ``connection``; the number of rows the last one changed."""
    # SQLite says "database is locked" once its busy timeout is spent; outside a
    # transaction the statement can simply be tried again.
    for attempt in range(3):
        try:
            with connection.cursor() as cursor:
                for sql, params in statements:
                    cursor.execute(sql, params)
                return int(cursor.rowcount)
        except DatabaseError as e:
            if not is_locked(e) or connection.in_atomic_block or attempt == 2:
                raise
            time.sleep(random.uniform(0.01, 0.1))
    raise AssertionError("unreachable")


def _once_more_if_lost(alias: str, what: str, work: Callable[[Any], T]) -> T:
    """Return ``work(connection)`` on the thread's connection to ``alias``; if that
    connection was lost meanwhile and held no transaction of the caller's, close it and
    run ``work`` once more on a new one. Any other failure raises ConnectionError."""
    connection = connections[alias]
    for attempt in range(2):
        lost = False
        try:
            with _reaching(alias, what):
                # The work's first cursor would replace a connection that fails
                # CONN_HEALTH_CHECKS: done first, so that `raw` is the one it uses.
                connection.close_if_health_check_failed()
                # Asked before the work: inside the broker's own atomic() a caller's
                # transaction cannot be told from it.
                free = not connection.in_atomic_block and connection.get_autocommit()
                raw = connection.connection
                try:
                    return work(connection)
                except (OperationalError, InterfaceError):
                    # This try's driver connection, not Django's current one: when the
                    # rollback of a failed atomic() fails, Django closes the connection
                    # and already opens the next one.
                    lost = free and _closed(raw)
                    raise
        except ConnectionError:
            # The server restarted, or cut this thread's connection (a job being
            # retried may have lost it): _reaching closed it, and one more try runs on a
            # new one, as a lost Redis send is repeated once. Not repeated: an error that
            # left the connection working (a statement timeout would wait twice), a
            # connection that could not be opened, and work in a transaction of the
            # caller's (atomic() or autocommit off), which is gone with the connection.
            if attempt or not lost:
                raise
    raise AssertionError("unreachable")


def _closed(raw: Any) -> bool:
    """Whether the driver connection ``raw`` was lost or closed (psycopg marks it);
    False for None, or a driver that cannot tell."""
    return raw is not None and bool(getattr(raw, "closed", False))


@contextmanager
def _reaching(alias: str, what: str) -> Iterator[None]:
    try:
        yield
    except (OperationalError, InterfaceError) as e:
        if is_locked(e):
            raise
        connection = connections[alias]
        if not connection.in_atomic_block:
            # Django reuses a broken connection until something closes it (a request's
            # end does, a producer thread has none): close it, so the next call reconnects.
            try:
                connection.close()
            except DatabaseError:
                pass
        raise ConnectionError(f"the database broker could not {what} on db://{alias}: {e}") from e


def _has_psycopg() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        logger.warning(
            "psycopg 3 is not installed: PostgreSQL consumers poll instead of using LISTEN/NOTIFY "
            "(pip install 'djqueue[postgres]')"
        )
        return False
    return True


def _parse_alias(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ConfigurationError(f"cannot parse {mask_url(url)!r}: {e}") from None
    if parts.scheme != "db" or not parts.netloc or parts.path not in ("", "/") or parts.query:
        options = "; the broker's options go in DJQUEUE['BROKER_OPTIONS'], not the URL" if parts.query else ""
        raise ConfigurationError(
            f"{mask_url(url)!r} is not a database broker URL: use db://ALIAS, where ALIAS is a key "
            f"of settings.DATABASES (e.g. db://default){options}"
        )
    return parts.netloc


def _check_alias(alias: str) -> None:
    from django.conf import settings

    databases = getattr(settings, "DATABASES", None) or {}
    if alias not in databases:
        raise ConfigurationError(
            f"db://{alias} names the database alias {alias!r}, which is not a key of "
            f"settings.DATABASES (known aliases: {', '.join(sorted(databases)) or 'none'})"
        )
    vendor = connections[alias].vendor
    if vendor not in VENDORS:
        raise ConfigurationError(
            f"db://{alias}: settings.DATABASES[{alias!r}] is a {vendor} database; the database "
            "broker supports PostgreSQL and SQLite (use redis:// or amqp:// with other databases)"
        )
