"""The database broker (``db://ALIAS``): queues as rows of a Django database.

One table, ``djqueue_queuedmessage``. A row's ``available_at`` (ms) is its eta while it
waits and the end of its lease while a consumer holds it, so one indexed range scan
(``available_at <= now``, by priority, then age) finds new, due and abandoned messages
alike. A claim sets ``lease_owner`` and ``available_at = now + lease`` and counts a
delivery; a heartbeat renews the leases of held rows every ``lease / 3``; ack and nack
delete the row; requeue clears the lease.

PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` and wakes idle consumers with
LISTEN/NOTIFY; SQLite claims in a short ``BEGIN IMMEDIATE`` transaction and polls every
``poll_interval`` ms. Enqueueing uses the thread's own Django connection, so a message
sent inside ``transaction.atomic()`` is rolled back with it; consumers use connections
of their own (see ``_Connection``). User documentation: docs/database-broker.md.
"""

from __future__ import annotations

import logging
import random
import selectors
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction

from ..errors import BrokerError, ConfigurationError, ConnectionError, DecodeError
from ..message import Message, current_millis
from . import mask_url
from .base import Broker, Consumer, MessageProxy, QueueStats

logger = logging.getLogger("djqueue.broker.database")

T = TypeVar("T")

VENDORS = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
CHANNEL = "djqueue"  # NOTIFY channel; the payload is the queue name
# An idle PostgreSQL consumer looks at its queue at least this often (s), in case a
# notification was lost with the LISTEN connection; NOTIFY does the real work.
MAX_IDLE = 10.0
# Acks and nacks wait at most about this long (s) to be deleted in one statement.
ACK_FLUSH_INTERVAL = 0.05
# A consumer with only a few free slots waits this long (s) for more before claiming.
BATCH_WINDOW = 0.005
CHUNK = 500  # ids per IN (...) list on SQLite
# A message delivered this many times without an ack (the processes holding it died) is
# held alone: a consumer holds at most one such message at a time, so a job that kills
# its process cannot take the same innocent messages down with it again and again
# until MaxDeliveries dead-letters them too.
ISOLATE_AFTER = 2
FRESH = f"AND delivery_count < {ISOLATE_AFTER} "


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
        _check_alias(alias)
        for name, value in (("lease", lease), ("poll_interval", poll_interval)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(f"the database broker's {name} must be a positive int (ms)")
        self.alias = alias
        self.vendor: str = connections[alias].vendor
        self.lease = lease
        self.poll_interval = poll_interval
        self.listen = bool(listen) and self.vendor == "postgresql" and _has_psycopg()
        self.sql = _Sql(self.vendor)
        self._lock = threading.Lock()
        self._consumers: set[_DatabaseConsumer] = set()
        self._maintenance: _Maintenance | None = None
        self._listener: _Listener | None = None
        super().__init__(middleware, **kwargs)

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
        connection = connections[self.alias]
        now = current_millis()
        values = [
            (q, mid, pri, now if eta is None else int(eta), data, now) for q, mid, pri, eta, data in rows
        ]
        queues = sorted({row[0] for row in rows})
        statements = self.sql.insert(values, queues)
        with _reaching(self.alias, "enqueue"):
            if len(statements) > 1:
                with transaction.atomic(using=self.alias):
                    _write(connection, statements)
            else:
                _write(connection, statements)
        if not self.listen:  # wake this process's consumers at once (after commit)
            for queue_name in queues:
                transaction.on_commit(partial(self.wake, queue_name), using=self.alias)

    # -- consuming ----------------------------------------------------------------

    def consume(self, queue_name: str, *, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        self.declare_queue(queue_name)
        consumer = _DatabaseConsumer(self, queue_name, prefetch, timeout)
        with self._lock:
            self._consumers.add(consumer)
            if self._maintenance is None:
                self._maintenance = _Maintenance(self)
                self._maintenance.start()
            if self.listen and self._listener is None:
                self._listener = _Listener(self)
                self._listener.start()
        return consumer

    def consumers(self) -> list[_DatabaseConsumer]:
        with self._lock:
            return list(self._consumers)

    def wake(self, queue_name: str | None = None) -> None:
        """Make this process's idle consumers of ``queue_name`` (None: all) look for work."""
        for consumer in self.consumers():
            if queue_name is None or consumer.queue_name == queue_name:
                consumer.wake()

    def _forget(self, consumer: _DatabaseConsumer) -> None:
        with self._lock:
            self._consumers.discard(consumer)
            if self._consumers:
                return
            threads = [self._maintenance, self._listener]
            self._maintenance = self._listener = None
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
        with _reaching(self.alias, "purge"), connections[self.alias].cursor() as cursor:
            cursor.execute(self.sql.purge, [queue_name, current_millis()])

    def cancel(self, message_id: str, *, queue_name: str | None = None) -> bool:
        sql, params = self.sql.cancel(message_id, queue_name, current_millis())
        with _reaching(self.alias, "cancel"), connections[self.alias].cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount > 0

    def close(self) -> None:
        for consumer in self.consumers():
            consumer.close()


def _write(connection: Any, statements: list[tuple[str, list[Any]]]) -> None:
    # SQLite says "database is locked" once its busy timeout is spent; outside a
    # transaction the statement can simply be tried again.
    for attempt in range(3):
        try:
            with connection.cursor() as cursor:
                for sql, params in statements:
                    cursor.execute(sql, params)
            return
        except DatabaseError as e:
            if not _is_locked(e) or connection.in_atomic_block or attempt == 2:
                raise
            time.sleep(random.uniform(0.01, 0.1))


@contextmanager
def _reaching(alias: str, what: str) -> Iterator[None]:
    try:
        yield
    except (OperationalError, InterfaceError) as e:
        if _is_locked(e):
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


def _is_locked(error: BaseException) -> bool:
    return "database is locked" in str(error) or "database table is locked" in str(error)


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
        raise ConfigurationError(
            f"{mask_url(url)!r} is not a database broker URL: use db://ALIAS, where ALIAS is a key "
            "of settings.DATABASES (e.g. db://default)"
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


def _chunks(ids: list[int], size: int = CHUNK) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


class _Sql:
    """The broker's statements for one vendor; methods taking a cursor run them."""

    def __init__(self, vendor: str) -> None:
        from ..models import QueuedMessage

        self.pg = vendor == "postgresql"
        t = self.table = f'"{QueuedMessage._meta.db_table}"'
        self.columns = "queue_name, message_id, priority, available_at, payload, created_at, delivery_count"
        order = "ORDER BY priority DESC, available_at, id"
        self.due = (
            f"SELECT id, available_at FROM {t} WHERE queue_name = %s AND available_at <= %s "
            f"{{}}{order} LIMIT %s"
        )
        unclaimed = "(lease_owner IS NULL OR available_at <= %s)"
        self.stats = (
            "SELECT SUM(CASE WHEN available_at <= %s THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN available_at > %s AND lease_owner IS NULL THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN available_at > %s AND lease_owner IS NOT NULL THEN 1 ELSE 0 END) "
            f"FROM {t} WHERE queue_name = %s"
        )
        self.purge = f"DELETE FROM {t} WHERE queue_name = %s AND {unclaimed}"
        self.cancel_sql = f"DELETE FROM {t} WHERE message_id = %s AND {unclaimed}"
        # "{}" takes FRESH while the consumer holds a message delivered ISOLATE_AFTER times.
        self.next_due = f"SELECT MIN(available_at) FROM {t} WHERE queue_name = %s {{}}"
        self.peek = f"SELECT 1 FROM {t} WHERE queue_name = %s AND available_at <= %s {{}}LIMIT 1"
        self.due_sqlite = (
            f"SELECT id, payload, delivery_count FROM {t} WHERE queue_name = %s AND available_at <= %s "
            f"{{}}{order} LIMIT %s"
        )
        self.max_params = 6000 if self.pg else 990

    def cancel(self, message_id: str, queue_name: str | None, now: int) -> tuple[str, list[Any]]:
        if queue_name is None:
            return self.cancel_sql, [message_id, now]
        return self.cancel_sql + " AND queue_name = %s", [message_id, now, queue_name]

    def insert(self, rows: list[tuple[Any, ...]], queues: list[str]) -> list[tuple[str, list[Any]]]:
        """INSERT statements for ``rows``, several per statement; on PostgreSQL the last
        one also notifies each queue."""
        per_statement = self.max_params // 6
        statements = []
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            values = ", ".join(["(%s, %s, %s, %s, %s, %s, 0)"] * len(chunk))
            sql = f"INSERT INTO {self.table} ({self.columns}) VALUES {values}"
            params = [value for row in chunk for value in row]
            if self.pg and start + per_statement >= len(rows):
                notify = ", ".join(["(%s)"] * len(queues))
                sql = f"WITH ins AS ({sql}) SELECT pg_notify(%s, q) FROM (VALUES {notify}) AS v(q)"
                params += [CHANNEL, *queues]
            statements.append((sql, params))
        return statements

    def claim(
        self,
        queue: str,
        owner: str,
        count: int,
        now: int,
        lease_end: int,
        acks: list[int],
        cursor: Any,
        *,
        fresh_only: bool = False,
    ) -> tuple[list[tuple[int, bytes, int]], int | None]:
        """Delete the acked rows and claim up to ``count`` due ones: [(id, payload,
        delivery count)] in priority then eta order, and the next available_at if short.
        ``fresh_only``: skip messages already delivered ISOLATE_AFTER times."""
        fresh = FRESH if fresh_only else ""
        if self.pg:
            rows = self._claim_pg(queue, owner, count, now, lease_end, acks, cursor, fresh)
        else:
            rows = self._claim_sqlite(queue, owner, count, now, lease_end, acks, cursor, fresh)
        next_due = None
        if len(rows) < count and self.pg:
            cursor.execute(self.next_due.format(fresh), [queue])
            next_due = cursor.fetchone()[0]
        return rows, next_due

    def _claim_pg(
        self,
        queue: str,
        owner: str,
        count: int,
        now: int,
        lease_end: int,
        acks: list[int],
        cursor: Any,
        fresh: str,
    ) -> list[tuple[int, bytes, int]]:
        t, params = self.table, []
        acked = ""
        if acks:
            acked = f"acked AS (DELETE FROM {t} WHERE id = ANY(%s) AND lease_owner = %s), "
            params += [acks, owner]
        cursor.execute(
            f"WITH {acked}claimed AS ({self.due.format(fresh)} FOR UPDATE SKIP LOCKED) "
            f"UPDATE {t} AS m SET lease_owner = %s, available_at = %s, delivery_count = m.delivery_count + 1 "
            "FROM claimed WHERE m.id = claimed.id "
            "RETURNING m.id, m.payload, m.delivery_count, m.priority, claimed.available_at",
            [*params, queue, now, count, owner, lease_end],
        )
        # RETURNING has no order: restore the claim's (priority, then eta, then age).
        rows = sorted(cursor.fetchall(), key=lambda r: (-r[3], r[4], r[0]))
        return [(r[0], r[1], r[2]) for r in rows]

    def _claim_sqlite(
        self,
        queue: str,
        owner: str,
        count: int,
        now: int,
        lease_end: int,
        acks: list[int],
        cursor: Any,
        fresh: str,
    ) -> list[tuple[int, bytes, int]]:
        t = self.table
        if not acks:
            # Look before locking: an idle poll must not take the database's write lock.
            cursor.execute(self.peek.format(fresh), [queue, now])
            if cursor.fetchone() is None:
                return []
        cursor.execute("BEGIN IMMEDIATE")
        try:
            self._delete_sqlite(acks, owner, cursor)
            cursor.execute(self.due_sqlite.format(fresh), [queue, now, count])
            rows = cursor.fetchall()
            for chunk in _chunks([r[0] for r in rows]):
                cursor.execute(
                    f"UPDATE {t} SET lease_owner = %s, available_at = %s, "
                    f"delivery_count = delivery_count + 1 WHERE id IN ({', '.join(['%s'] * len(chunk))})",
                    [owner, lease_end, *chunk],
                )
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        return [(r[0], r[1], r[2] + 1) for r in rows]

    def _delete_sqlite(self, ids: list[int], owner: str, cursor: Any) -> None:
        for chunk in _chunks(ids):
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(
                f"DELETE FROM {self.table} WHERE lease_owner = %s AND id IN ({marks})", [owner, *chunk]
            )

    def delete(self, ids: list[int], owner: str, cursor: Any) -> None:
        """Acks and nacks: delete rows this owner holds."""
        if self.pg:
            cursor.execute(f"DELETE FROM {self.table} WHERE id = ANY(%s) AND lease_owner = %s", [ids, owner])
        else:
            self._delete_sqlite(ids, owner, cursor)

    def requeue(self, ids: list[int], owner: str, queue: str, now: int, cursor: Any) -> None:
        """Clear the lease, making the row due now; the delivery is not counted."""
        update = (
            f"UPDATE {self.table} SET lease_owner = NULL, available_at = %s, "
            "delivery_count = CASE WHEN delivery_count > 0 THEN delivery_count - 1 ELSE 0 END "
        )
        if self.pg:
            cursor.execute(
                f"WITH r AS ({update} WHERE id = ANY(%s) AND lease_owner = %s RETURNING 1) "
                "SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM r LIMIT 1) AS any_requeued",
                [now, ids, owner, CHANNEL, queue],
            )
            return
        for chunk in _chunks(ids):
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(f"{update} WHERE lease_owner = %s AND id IN ({marks})", [now, owner, *chunk])

    def renew(self, ids: list[int], owner: str, lease_end: int, cursor: Any) -> None:
        """The heartbeat: extend the lease of rows this owner holds."""
        update = f"UPDATE {self.table} SET available_at = %s WHERE lease_owner = %s AND id "
        if self.pg:
            cursor.execute(update + "= ANY(%s)", [lease_end, owner, ids])
            return
        for chunk in _chunks(ids):
            cursor.execute(update + f"IN ({', '.join(['%s'] * len(chunk))})", [lease_end, owner, *chunk])


class _Connection:
    """A connection of the consumer's own to the alias, never a thread's Django connection.

    Claims, acks and heartbeats thus stay out of callers' transactions and survive
    ``close_old_connections()`` in worker threads, and acking opens no connection in a
    worker thread. Usable from any thread, one at a time.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.lock = threading.Lock()
        self.wrapper: Any = None
        self.closed = False

    def run(self, work: Callable[[Any], T]) -> T:
        with self.lock:
            if self.closed:
                raise InterfaceError("the consumer is closed")
            try:
                if self.wrapper is None:
                    self.wrapper = connections.create_connection(self.alias)
                    self.wrapper.inc_thread_sharing()
                    if self.wrapper.vendor == "postgresql":
                        # Claims, acks and heartbeats need not wait for the WAL to reach
                        # the disk: if the server crashes and loses the last of them, the
                        # message is delivered again, as at-least-once allows. Enqueues
                        # (on the caller's connection) stay durable.
                        with self.wrapper.cursor() as cursor:
                            cursor.execute("SET synchronous_commit TO OFF")
                with self.wrapper.cursor() as cursor:
                    return work(cursor)
            except DatabaseError as e:
                if not _is_locked(e):
                    self._close()  # it may be broken: reconnect on next use
                raise

    def close(self) -> None:
        """Close for good."""
        with self.lock:
            self.closed = True
            self._close()

    def _close(self) -> None:
        wrapper, self.wrapper = self.wrapper, None
        if wrapper is not None:
            try:
                wrapper.close()
            except DatabaseError:
                pass


class _DatabaseConsumer(Consumer):
    def __init__(self, broker: DatabaseBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.sql = broker.sql
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.low_water = max(1, self.prefetch // 2)
        self.timeout = timeout / 1000
        self.owner = uuid.uuid4().hex
        self.db = _Connection(broker.alias)
        self.cond = threading.Condition()
        self.held: set[int] = set()  # claimed and not settled, including those in ready
        self.isolated: int | None = None  # the held message delivered over ISOLATE_AFTER times
        self.ready: deque[MessageProxy] = deque()
        self.acks: list[int] = []
        self.acks_since = 0.0
        self.notified = True  # look at once
        self.drained = False
        self.wake_at = 0.0
        self.partial_at: float | None = None
        self.closed = False
        self.failures = 0

    def __next__(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout
        while True:
            with self.cond:
                if self.ready:
                    return self.ready.popleft()
                now = time.monotonic()
                count, until = self._plan(now)
                if not count:
                    if now >= deadline or self.closed:
                        return None
                    self.cond.wait(min(deadline, until) - now)
                    continue
                # Cleared before claiming: a notification arriving meanwhile claims again.
                self.notified = False
                self.partial_at = None
                acks, self.acks = self.acks, []
                fresh_only = self.isolated is not None
            self._claim(count, acks, fresh_only)

    def _plan(self, now: float) -> tuple[int, float]:
        """How many messages to claim now, or (0, when to look again)."""
        free = self.prefetch - len(self.held)
        if free <= 0 or self.closed:
            return 0, float("inf")  # an ack or requeue wakes us
        if self.notified or (self.drained and now >= self.wake_at):
            return free, now
        if self.drained:
            return 0, self.wake_at
        # Work is flowing: claim at least half the prefetch at a time, unless a few slots
        # have stayed free for BATCH_WINDOW.
        if free >= self.low_water:
            return free, now
        if self.partial_at is None:
            self.partial_at = now + BATCH_WINDOW
        return (free, now) if now >= self.partial_at else (0, self.partial_at)

    def _claim(self, count: int, acks: list[int], fresh_only: bool = False) -> None:
        now = current_millis()
        work = partial(
            self.sql.claim,
            self.queue_name,
            self.owner,
            count,
            now,
            now + self.broker.lease,
            acks,
            fresh_only=fresh_only,
        )
        try:
            rows, next_due = self.db.run(work)
        except DatabaseError as e:
            with self.cond:
                self.acks[:0] = acks
            if _is_locked(e):
                # SQLite is busy: look again soon, with jitter so that claimers spread out.
                self._retry_in(random.uniform(0.01, 0.05))
                return
            if not isinstance(e, OperationalError | InterfaceError) or self.closed:
                raise BrokerError(
                    f"claiming from {self.queue_name!r} on db://{self.broker.alias} failed: {e}"
                )
            # The database is unreachable. Raising would make the worker close this
            # consumer and give back the messages its threads are running, so wait
            # and try again; the held messages' leases last as long as the outage allows.
            self.failures += 1
            delay = min(0.1 * 2**self.failures, 5.0)
            logger.warning(
                "database broker: cannot claim from %r on db://%s (%s); trying again in %.1f s",
                self.queue_name,
                self.broker.alias,
                e,
                delay,
            )
            self._retry_in(delay)
            return
        self.failures = 0
        proxies = [self._proxy(row_id, bytes(payload), n) for row_id, payload, n in rows]
        with self.cond:
            if self.closed:  # closed from another thread meanwhile: give them back
                orphans = [p.tag for p in proxies]
                proxies = []
            else:
                orphans = []
                for proxy in proxies:
                    if proxy.delivery_count > ISOLATE_AFTER:
                        if self.isolated is not None:
                            orphans.append(proxy.tag)  # for another consumer; not a delivery
                            continue
                        self.isolated = proxy.tag
                    self.held.add(proxy.tag)
                    self.ready.append(proxy)
            self.drained = len(rows) < count
            if self.drained:
                if self.broker.listen:
                    due_in = MAX_IDLE if next_due is None else max(0, next_due - current_millis()) / 1000
                    self.wake_at = time.monotonic() + min(due_in, MAX_IDLE)
                else:
                    self.wake_at = time.monotonic() + self.broker.poll_interval / 1000
        self._give_back(orphans)

    def _retry_in(self, seconds: float) -> None:
        with self.cond:
            self.drained, self.wake_at = True, time.monotonic() + seconds

    def _proxy(self, row_id: int, data: bytes, delivery_count: int) -> MessageProxy:
        try:
            message = Message.decode(data)
        except DecodeError as e:
            return MessageProxy.malformed(data, e, self.queue_name, tag=row_id, delivery_count=delivery_count)
        return MessageProxy(message, data=data, tag=row_id, delivery_count=delivery_count)

    def wake(self) -> None:
        with self.cond:
            self.notified = True
            self.cond.notify_all()

    def ack(self, proxy: MessageProxy) -> None:
        # Buffered, never sent from the worker thread: the consumer thread deletes acked
        # rows with its next claim, the maintenance thread those that waited
        # ACK_FLUSH_INTERVAL, and close() the rest.
        with self.cond:
            if proxy.tag not in self.held:
                return
            self.held.discard(proxy.tag)
            if proxy.tag == self.isolated:
                self._release_isolated()
            self.acks.append(proxy.tag)
            first = len(self.acks) == 1
            if first:
                self.acks_since = time.monotonic()
            if self.prefetch - len(self.held) in (1, self.low_water):
                self.cond.notify_all()
        if first:
            maintenance = self.broker._maintenance
            if maintenance is not None:
                maintenance.poke()

    # The DeadLetters middleware wrote the DeadLetter row (the database broker's dead
    # letter store) before nack is called: the queued row just goes, like an ack.
    nack = ack

    def flush_acks(self, older_than: float | None = None) -> bool:
        """Delete acked rows now (or only once the oldest ack is ``older_than`` s old);
        True if acks are still waiting."""
        with self.cond:
            if not self.acks:
                return False
            if older_than is not None and time.monotonic() - self.acks_since < older_than:
                return True
            acks, self.acks = self.acks, []
        try:
            self.db.run(partial(self.sql.delete, acks, self.owner))
        except DatabaseError:
            with self.cond:
                self.acks[:0] = acks
            raise
        return False

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        with self.cond:
            ids = [p.tag for p in proxies if p.tag in self.held]
            self.held.difference_update(ids)
            if self.isolated in ids:
                self._release_isolated()
            self.cond.notify_all()
        self._give_back(ids)

    def _release_isolated(self) -> None:
        # Under the cond: look at once for the next much-delivered message we skipped.
        self.isolated = None
        self.notified = True
        self.cond.notify_all()

    def _give_back(self, ids: list[int]) -> None:
        if not ids:
            return
        self.db.run(partial(self.sql.requeue, ids, self.owner, self.queue_name, current_millis()))
        if not self.broker.listen:
            self.broker.wake(self.queue_name)

    def renew(self) -> None:
        """The heartbeat: push the lease of every held message to now + lease."""
        with self.cond:
            ids = list(self.held)
        if ids:
            self.db.run(partial(self.sql.renew, ids, self.owner, current_millis() + self.broker.lease))

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            ids = list(self.held)
            self.held.clear()
            self.isolated = None
            self.ready.clear()
            self.cond.notify_all()
        for settle in (self.flush_acks, partial(self._give_back, ids)):
            try:
                settle()
            except DatabaseError:
                logger.warning(
                    "database broker: could not settle the messages of %r on close; "
                    "their leases will expire and they will be delivered again",
                    self.queue_name,
                    exc_info=True,
                )
        self.db.close()
        self.broker._forget(self)


class _Maintenance(threading.Thread):
    """One per broker while it has consumers: renews the leases of every consumer's
    held messages each lease/3, and deletes acked rows that waited ACK_FLUSH_INTERVAL."""

    def __init__(self, broker: DatabaseBroker) -> None:
        super().__init__(name=f"djqueue-db-heartbeat-{broker.alias}", daemon=True)
        self.broker = broker
        self.interval = broker.lease / 3000
        self.cond = threading.Condition()
        self.stopping = False
        self.poked = False

    def poke(self) -> None:
        with self.cond:
            self.poked = True
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.join(5)

    def run(self) -> None:
        next_beat = time.monotonic() + self.interval
        while True:
            with self.cond:
                timeout = next_beat - time.monotonic()
                if self.poked:
                    timeout = min(timeout, ACK_FLUSH_INTERVAL / 2)
                if timeout > 0 and not self.stopping:
                    self.cond.wait(timeout)
                if self.stopping:
                    return
                self.poked = False
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat = time.monotonic() + self.interval
            waiting = False
            for consumer in self.broker.consumers():
                try:
                    waiting |= consumer.flush_acks(older_than=ACK_FLUSH_INTERVAL / 2)
                    if beat:
                        consumer.renew()
                except DatabaseError:
                    logger.warning("database broker heartbeat failed; trying again", exc_info=True)
            if waiting:
                self.poke()


class _Listener(threading.Thread):
    """PostgreSQL: LISTENs on a connection of its own and wakes the consumers of each
    queue named in a notification. Enqueues notify in their own transaction, so a
    notification arrives at commit, and never for a rolled back message."""

    def __init__(self, broker: DatabaseBroker) -> None:
        super().__init__(name=f"djqueue-db-listen-{broker.alias}", daemon=True)
        self.broker = broker
        self.stopping = threading.Event()
        # stop() writes to one end to interrupt the wait for notifications.
        self.interrupt, self.interrupter = socket.socketpair()

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.interrupter.send(b"x")
        except OSError:
            pass  # the thread has ended and closed it
        self.join(5)

    def run(self) -> None:
        try:
            self._listen()
        finally:
            self.interrupt.close()
            self.interrupter.close()

    def _listen(self) -> None:
        import psycopg

        backoff = 0.1
        while not self.stopping.is_set():
            conn = None
            try:
                params = connections.create_connection(self.broker.alias).get_connection_params()
                params.setdefault("connect_timeout", 10)
                conn = psycopg.Connection.connect(**params, autocommit=True)
                conn.execute(f"LISTEN {CHANNEL}")
                self.broker.wake()  # whatever was sent before we listened
                backoff = 0.1
                with selectors.DefaultSelector() as selector:
                    selector.register(conn.fileno(), selectors.EVENT_READ)
                    selector.register(self.interrupt, selectors.EVENT_READ)
                    while not self.stopping.is_set():
                        selector.select()
                        for notify in conn.notifies(timeout=0):
                            self.broker.wake(notify.payload)
            except Exception as e:
                if self.stopping.is_set():
                    break
                logger.warning(
                    "LISTEN connection of db://%s failed (%s); again in %.1f s", self.broker.alias, e, backoff
                )
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None:
                    conn.close()
