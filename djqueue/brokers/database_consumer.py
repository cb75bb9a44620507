"""The consuming side of the database broker: a consumer per queue, on a connection of its own.

A consumer claims due rows in batches of up to its free prefetch slots (database_sql.py)
and hands them out one by one. Acks are buffered: the consumer deletes them with its
next claim, the broker's maintenance thread (database_threads.py) those that waited
``ACK_FLUSH_INTERVAL``. An idle consumer sleeps until it is woken (a notification on
PostgreSQL, an ack, a local enqueue) or its next look is due.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connections
from django.db.utils import load_backend

from ..errors import BrokerError, DecodeError
from ..message import Message, current_millis
from .base import Consumer, MessageProxy
from .database_sql import ISOLATE_AFTER, Claimed, data_version, is_locked
from .reconnecting import Reconnecting

if TYPE_CHECKING:
    from .database import DatabaseBroker

logger = logging.getLogger("djqueue.broker.database")

T = TypeVar("T")

# An idle PostgreSQL consumer looks at its queue at least this often (s), in case a
# notification was lost with the LISTEN connection; NOTIFY does the real work.
MAX_IDLE = 10.0
# An idle SQLite consumer reads SQLite's change counter this many times per poll
# interval (but at most every 2 ms), and looks for work as soon as another connection
# has committed: SQLite cannot notify other processes, and this read touches no table
# and takes no lock. The full look every poll interval finds what comes due by time.
CHANGE_CHECKS = 5
# Acks and nacks wait at most about this long (s) to be deleted in one statement.
ACK_FLUSH_INTERVAL = 0.05
# A consumer with only a few free slots waits this long (s) for more before claiming.
BATCH_WINDOW = 0.005
# Seconds a consumer's own PostgreSQL connection may take to connect (unless the alias's
# OPTIONS say otherwise).
CONNECT_TIMEOUT = 10
# Put before each statement of a consumer on PostgreSQL but its claim (which says it
# itself: CLAIM_ASYNC_COMMIT in database_sql.py), in the same query string. Claims,
# acks and heartbeats need not wait for the WAL to reach the disk: if the server crashes
# and loses the last of them, the message is delivered again, as at-least-once allows.
# LOCAL, for the statement's own transaction: a session setting would outlive it, and a
# transaction-mode pooler (PgBouncer) hands the server connection on to other clients,
# whose commits would then be asynchronous too. Enqueues (on the caller's connection)
# stay durable.
ASYNC_COMMIT = "SET LOCAL synchronous_commit TO OFF; "
# With LISTEN on, a consumer's connection is the server's own (LISTEN needs one; behind
# a transaction-mode pooler the docs turn it off), and its claim, one statement, is
# prepared there: PostgreSQL then plans it once per connection instead of on every
# claim, about half a millisecond after an idle pause, on every job's way to a worker.
# Only the claim: Django turns psycopg's preparing off (prepare_threshold None), and
# this asks for it statement by statement.
PREPARE_WHEN_ASKED = 1 << 30
# SQLSTATEs of a server that lost the prepared claim, or already has one of that name:
# what a transaction-mode pooler does to prepared statements.
LOST_PREPARED = {"26000", "42P05"}
# The longest close() waits (s) for another thread's ack deletion to finish.
CLOSE_WAIT = 10.0
# A PostgreSQL queue that just ran dry is asked when its next message comes due this
# long (s) after: not at once, so that the message just claimed starts unhindered.
DUE_LOOK_DELAY = 0.005


class Connection:
    """A connection of the consumer's own to the alias, never a thread's Django connection.

    Claims, acks and heartbeats thus stay out of callers' transactions and survive
    ``close_old_connections()`` in worker threads, and acking opens no connection in a
    worker thread. Usable from any thread, one at a time.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.lock = threading.Lock()
        self.wrapper: Any = None
        self.postgresql = self.psycopg3 = False
        # psycopg 3's server-side binding cursor class, which can prepare (set on connect).
        self.server_cursor: Any = None
        self.closed = False
        # For cut_if_stuck(), from another thread, under cut_lock: when the call in
        # progress started (None: no call), and a duplicate of the PostgreSQL socket
        # (shutting it down cuts the connection; a descriptor of our own cannot be reused
        # by another connection meanwhile).
        self.cut_lock = threading.Lock()
        self.busy_since: float | None = None
        self.sock: socket.socket | None = None

    def run(self, work: Callable[[Any], T], *, claim: bool = False, prepare: bool = False) -> T:
        """``work(cursor)`` on this connection. ``claim``: the work is a claim, whose one
        statement commits asynchronously by itself; ``prepare``: prepare it on the
        server (psycopg 3 only)."""
        with self.lock:
            if self.closed:
                raise InterfaceError("the consumer is closed")
            with self.cut_lock:
                self.busy_since = time.monotonic()
            try:
                if self.wrapper is None:
                    self._connect()
                with self.wrapper.cursor() as cursor:
                    if not self.postgresql:
                        return work(cursor)
                    if not claim:
                        return work(_AsyncCommit(cursor, self.psycopg3))
                    if not (prepare and self.server_cursor):
                        return work(cursor)
                    raw = self.server_cursor(self.wrapper.connection)
                    with self.wrapper.make_cursor(_Preparing(raw)) as prepared:
                        return work(prepared)
            except (DatabaseError, InterfaceError) as e:
                # InterfaceError is not a DatabaseError in Django (PEP 249 siblings); a
                # driver raises it for a connection it closed: reconnect too.
                if not is_locked(e):
                    self._close()  # it may be broken: reconnect on next use
                raise
            finally:
                with self.cut_lock:
                    self.busy_since = None

    def _connect(self) -> None:
        self.wrapper = _own_connection(self.alias)
        self.wrapper.inc_thread_sharing()
        self.postgresql = self.wrapper.vendor == "postgresql"
        if not self.postgresql:
            return
        from django.db.backends.postgresql.psycopg_any import is_psycopg3

        self.psycopg3 = is_psycopg3
        self.wrapper.ensure_connection()
        if is_psycopg3:
            import psycopg

            self.server_cursor = psycopg.Cursor
            self.wrapper.connection.prepare_threshold = PREPARE_WHEN_ASKED
        try:
            sock = socket.socket(fileno=os.dup(self.wrapper.connection.fileno()))
        except OSError:  # out of descriptors, say: this connection goes unwatched
            sock = None
        with self.cut_lock:
            self.sock = sock

    def cut_if_stuck(self, limit: float) -> bool:
        """PostgreSQL: shut the connection down under a call that has waited over
        ``limit`` s for the server, so that it fails and the next call reconnects. Called
        from another thread, without the lock, which the stuck call holds."""
        with self.cut_lock:
            since, sock = self.busy_since, self.sock
            if since is None or sock is None or time.monotonic() - since < limit:
                return False
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the waiting call with an error
            except OSError:
                return False
        logger.warning(
            "database broker: a call on db://%s waited over %.1f s for the server; "
            "reconnecting (the server hangs, or the network path to it is gone)",
            self.alias,
            limit,
        )
        return True

    def data_version(self) -> int | None:
        """SQLite's change counter, read on the DB-API connection itself (an idle
        consumer reads it many times a second); None if not connected or it failed."""
        with self.lock:
            if self.wrapper is None or self.wrapper.connection is None:
                return None
            try:
                return data_version(self.wrapper.connection)
            except Exception:
                return None  # the full look that follows reports what went wrong

    def close(self) -> None:
        """Close for good."""
        with self.lock:
            self.closed = True
            self._close()

    def _close(self) -> None:
        with self.cut_lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()  # the duplicate only
        wrapper, self.wrapper = self.wrapper, None
        if wrapper is not None:
            try:
                wrapper.close()
            except DatabaseError:
                pass


class _AsyncCommit:
    """A PostgreSQL cursor whose statements each commit with ``synchronous_commit`` off
    for their own transaction only (ASYNC_COMMIT), in the same round trip."""

    def __init__(self, cursor: Any, psycopg3: bool) -> None:
        self.cursor = cursor
        self.psycopg3 = psycopg3

    def execute(self, sql: str, params: Any = None) -> None:
        # Two statements in one simple query run as one transaction, which SET LOCAL lasts.
        self.cursor.execute(ASYNC_COMMIT + sql, params)
        if self.psycopg3:  # psycopg 3 reads the first statement's result, psycopg2 the last
            self.cursor.nextset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cursor, name)


class _Preparing:
    """A psycopg 3 server-side binding cursor that prepares each statement it runs (once
    per connection); given to Django's cursor wrapper, for its errors and execute
    wrappers."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Any = None) -> Any:
        return self.cursor.execute(sql, params, prepare=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cursor, name)


def _lost_prepared(error: BaseException) -> bool:
    return getattr(error.__cause__, "sqlstate", None) in LOST_PREPARED


def _own_connection(alias: str) -> Any:
    """A connection of the consumer's own, outside Django's connection pool (the
    ``"pool"`` option of PostgreSQL), which the consumer keeps for its lifetime."""
    settings_dict = connections.settings[alias]
    options = settings_dict.get("OPTIONS") or {}
    postgresql = connections[alias].vendor == "postgresql"  # PostGIS too
    if not postgresql and not options.get("pool"):
        return connections.create_connection(alias)
    own = {k: v for k, v in options.items() if k != "pool"}
    if postgresql:
        # Without it, connecting to a host that is gone waits for TCP to give up (minutes).
        own.setdefault("connect_timeout", CONNECT_TIMEOUT)
        # Client-side binding sends the simple query protocol, which takes ASYNC_COMMIT
        # and the statement in one query; server-side binding takes one statement.
        own.pop("server_side_binding", None)
    return load_backend(settings_dict["ENGINE"]).DatabaseWrapper({**settings_dict, "OPTIONS": own}, alias)


class DatabaseConsumer(Consumer):
    def __init__(self, broker: DatabaseBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.sql = broker.sql
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.low_water = max(1, self.prefetch // 2)
        self.timeout = timeout / 1000
        self.owner = uuid.uuid4().hex
        self.db = Connection(broker.alias)
        self.cond = threading.Condition()
        self.held: set[int] = set()  # claimed and not settled, including those in ready
        self.isolated: int | None = None  # the held message delivered over ISOLATE_AFTER times
        self.ready: deque[MessageProxy] = deque()
        self.acks: list[int] = []
        self.acks_since = 0.0
        self.notified = True  # look at once
        # The last look found fewer due messages than it asked for (or none was made).
        self.drained = True
        self.wake_at = 0.0
        self.partial_at: float | None = None
        self.closed = False
        self.flushing = 0  # flush_acks() calls in progress
        # An unreachable database: log lines and backoff of every broker, up to 5 s.
        self.reconnecting = Reconnecting(broker, queue_name, logger, limit=5.0)
        # SQLite, while drained: when to read the change counter next, and its value
        # before the last look (None: unknown, look in full).
        self.check_every: float | None = None
        if broker.vendor == "sqlite" and broker.poll_interval >= 4:
            self.check_every = max(broker.poll_interval / CHANGE_CHECKS, 2) / 1000
        self.check_at = float("inf")
        self.version: int | None = None

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
                # Only a change check, unless something else asks for a full look.
                notified = self.notified
                check_only = not notified and self.drained and now < self.wake_at
                # Cleared before claiming: a notification arriving meanwhile claims again.
                self.notified = False
                self.partial_at = None
                acks, self.acks = ([], self.acks) if check_only else (self.acks, [])
                fresh_only = self.isolated is not None
                # A notified idle consumer expects a message: it claims first, and asks
                # when the next one is due in a look that follows, off the latency path.
                idle = self.drained and not notified
            if check_only:
                self._check(now)
            else:
                self._claim(count, acks, fresh_only, idle)

    def _plan(self, now: float) -> tuple[int, float]:
        """How many messages to claim now, or (0, when to look again)."""
        free = self.prefetch - len(self.held)
        if free <= 0 or self.closed:
            return 0, float("inf")  # an ack or requeue wakes us
        if self.notified or (self.drained and now >= min(self.wake_at, self.check_at)):
            return free, now
        if self.drained:
            return 0, min(self.wake_at, self.check_at)
        # Work is flowing: claim at least half the prefetch at a time, unless a few slots
        # have stayed free for BATCH_WINDOW.
        if free >= self.low_water:
            return free, now
        if self.partial_at is None:
            self.partial_at = now + BATCH_WINDOW
        return (free, now) if now >= self.partial_at else (0, self.partial_at)

    def _check(self, now: float) -> None:
        """SQLite, idle: look in full at once if another connection committed since the
        last look (a new message, perhaps), else check again later."""
        assert self.check_every is not None
        version = self.db.data_version()
        with self.cond:
            self.check_at = now + self.check_every
            if version is None or version != self.version:
                self.notified = True

    def _claim(self, count: int, acks: list[int], fresh_only: bool, idle: bool) -> None:
        now = current_millis()
        # Only an idle consumer asks when the next message comes due (it costs the
        # database some planning): while work flows, claims come back full, and the
        # one that first comes up short is followed at once by a look that asks.
        next_due = self.broker.listen and idle
        claim = partial(
            self.sql.claim,
            queue=self.queue_name,
            owner=self.owner,
            count=count,
            now=now,
            lease_end=now + self.broker.lease,
            acks=acks,
            fresh_only=fresh_only,
            next_due=next_due,
        )

        def work(cursor: Any) -> tuple[int | None, Claimed]:
            # The change counter before the look: a commit after it shows as a change.
            version = data_version(cursor.db.connection) if self.check_every else None
            return version, claim(cursor)

        try:
            prepare = self.broker.listen and self.broker.prepare_claims
            version, (rows, due_at) = self.db.run(work, claim=True, prepare=prepare)
        except (DatabaseError, InterfaceError) as e:
            with self.cond:
                self.acks[:0] = acks
                self.version = None
            self._failed(e)
            return
        self.reconnecting.succeeded()
        proxies = [self._proxy(row_id, bytes(payload), n) for row_id, payload, n in rows]
        with self.cond:
            self.version = version
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
                if not self.broker.listen:
                    self.wake_at = time.monotonic() + self.broker.poll_interval / 1000
                elif not next_due:
                    # The queue just ran dry: ask when its next message is due.
                    self.wake_at = time.monotonic() + DUE_LOOK_DELAY
                else:
                    due_in = MAX_IDLE if due_at is None else max(0, due_at - current_millis()) / 1000
                    self.wake_at = time.monotonic() + min(due_in, MAX_IDLE)
                if self.check_every is not None:
                    self.check_at = time.monotonic() + self.check_every
            else:
                self.check_at = float("inf")
        try:
            self._give_back(orphans)
        except (DatabaseError, InterfaceError) as e:
            # Raising would make the worker close this consumer, which gives back the
            # messages its threads are running too; these few can wait for their lease.
            logger.warning(
                "database broker: could not give back %d message(s) of %r (%s); "
                "they will be delivered again when their lease runs out",
                len(orphans),
                self.queue_name,
                e,
            )

    def _failed(self, error: DatabaseError | InterfaceError) -> None:
        if is_locked(error):
            # SQLite is busy: look again soon, with jitter so that claimers spread out.
            self._retry_in(random.uniform(0.01, 0.05))
            return
        if _lost_prepared(error):
            # LISTEN on behind a transaction-mode pooler: each transaction may run on
            # another server connection. Every consumer of the broker claims unprepared
            # from now on (this one's connection was closed, so its next claim starts
            # afresh) rather than fail every look; one that was claiming meanwhile
            # fails once, here, and looks again at once too.
            if self.broker.prepare_claims:
                self.broker.prepare_claims = False
                logger.warning(
                    "database broker: db://%s lost a prepared claim statement (%s); claims "
                    "are no longer prepared. Behind a transaction-mode pooler (PgBouncer), "
                    'set "listen": False in the broker OPTIONS',
                    self.broker.alias,
                    error,
                )
            self._retry_in(0)
            return
        if not isinstance(error, OperationalError | InterfaceError) or self.closed:
            raise BrokerError(
                f"claiming from {self.queue_name!r} on db://{self.broker.alias} failed: {error}"
            )
        # The database is unreachable. Raising would make the worker close this
        # consumer and give back the messages its threads are running, so wait
        # and try again; the held messages' leases last as long as the outage allows.
        self._retry_in(self.reconnecting.failed(error))

    def _retry_in(self, seconds: float) -> None:
        with self.cond:
            self.drained, self.wake_at, self.check_at = True, time.monotonic() + seconds, float("inf")

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
            if not self._unhold(proxy.tag):
                return
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

    def nack(self, proxy: MessageProxy) -> None:
        # The DeadLetters middleware wrote the DeadLetter row (the database broker's dead
        # letter store) before nack is called: the queued row just goes, like an ack.
        # If that row could not be written, deleting would lose the message: it comes
        # back once a lease has passed, to fail and be dead-lettered again.
        if proxy.dead_lettered or not self.broker.keeps_dead_letters:
            self.ack(proxy)
            return
        with self.cond:
            if not self._unhold(proxy.tag):
                return
            self.cond.notify_all()
        logger.error(
            "database broker: the dead letter of %s was not stored; it is delivered again in %d ms",
            proxy.message_id,
            self.broker.lease,
        )
        self._give_back([proxy.tag], current_millis() + self.broker.lease)

    def flush_acks(self, older_than: float | None = None) -> bool:
        """Delete acked rows now (or only once the oldest ack is ``older_than`` s old);
        True if acks are still waiting."""
        with self.cond:
            if not self.acks:
                return False
            if older_than is not None and time.monotonic() - self.acks_since < older_than:
                return True
            acks, self.acks = self.acks, []
            # close() waits for this delete: acks taken here and then refused by a closed
            # connection would leave finished jobs to run again when their lease ends.
            self.flushing += 1
        try:
            self.db.run(partial(self.sql.delete, acks, self.owner))
        except (DatabaseError, InterfaceError):
            with self.cond:
                self.acks[:0] = acks
            raise
        finally:
            with self.cond:
                self.flushing -= 1
                self.cond.notify_all()
        return False

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        with self.cond:
            ids = [p.tag for p in proxies if self._unhold(p.tag)]
            self.cond.notify_all()
        self._give_back(ids)

    def _unhold(self, tag: int) -> bool:
        # Under the cond. False: not held (settled already, or the consumer closed).
        if tag not in self.held:
            return False
        self.held.discard(tag)
        if tag == self.isolated:
            self._release_isolated()
        return True

    def _release_isolated(self) -> None:
        # Under the cond: look at once for the next much-delivered message we skipped.
        self.isolated = None
        self.notified = True
        self.cond.notify_all()

    def _give_back(self, ids: list[int], due_at: int | None = None) -> None:
        if not ids:
            return
        due = current_millis() if due_at is None else due_at
        self.db.run(partial(self.sql.requeue, ids, self.owner, self.queue_name, due))
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
            # Another thread's flush_acks() in progress: let it delete its acks (or put
            # them back, for the flush below) before the connection closes.
            self.cond.wait_for(lambda: not self.flushing, timeout=CLOSE_WAIT)
        for settle in (self.flush_acks, partial(self._give_back, ids)):
            try:
                settle()
            except (DatabaseError, InterfaceError):
                logger.warning(
                    "database broker: could not settle the messages of %r on close; "
                    "their leases will expire and they will be delivered again",
                    self.queue_name,
                    exc_info=True,
                )
        self.db.close()
        self.broker._forget(self)
