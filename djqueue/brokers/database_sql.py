"""The database broker's statements, for PostgreSQL and SQLite (the design is in database.py).

Every method taking a cursor runs its statements on it; the others only build SQL. The
two vendors differ in three ways only: PostgreSQL claims in one statement (``FOR UPDATE
SKIP LOCKED``) where SQLite needs a short ``BEGIN IMMEDIATE`` transaction, a list of ids
is one array parameter on PostgreSQL and ``IN (...)`` chunks on SQLite, and PostgreSQL
notifies listeners of new and given-back messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

CHANNEL = "djqueue"  # NOTIFY channel; the payload is the queue name
CHUNK = 500  # ids per IN (...) list on SQLite
# A message delivered this many times without an ack (the processes holding it died) is
# held alone: a consumer holds at most one such message at a time, so a job that kills
# its process cannot take the same innocent messages down with it again and again
# until MaxDeliveries dead-letters them too.
ISOLATE_AFTER = 2
FRESH = f"AND delivery_count < {ISOLATE_AFTER} "
# The claim order: priority, then eta (or end of an abandoned lease), then age.
ORDER = "ORDER BY priority DESC, available_at, id"
LEASE = "lease_owner = %s, available_at = %s, delivery_count = delivery_count + 1"
# PostgreSQL: a claim turns synchronous_commit off for its own transaction, as the
# consumer's other statements do with ASYNC_COMMIT (database_consumer.py), but inside
# the one statement, which can then be prepared. set_config(..., true) is SET LOCAL; a
# filter without columns runs once, before the first row, even when no row is claimed
# (an ack-only claim has deletes to commit).
CLAIM_ASYNC_COMMIT = "WHERE (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL"


class Claimed(NamedTuple):
    """What a claim got: [(id, payload, delivery count)] in claim order; when it got
    fewer rows than it asked for, ``next_due`` (PostgreSQL, if asked) is the earliest
    ``available_at`` of the queue's other rows (None: no other row)."""

    rows: list[tuple[int, bytes, int]]
    next_due: int | None = None


def is_locked(error: BaseException) -> bool:
    """SQLite's busy timeout ran out: the statement may simply be tried again."""
    return "database is locked" in str(error) or "database table is locked" in str(error)


def data_version(connection: Any) -> int:
    """SQLite's change counter for a DB-API ``connection``: it moves whenever another
    connection commits. Reading it takes no lock and touches no table."""
    return int(connection.execute("PRAGMA data_version").fetchall()[0][0])


def chunks(ids: list[int], size: int = CHUNK) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


class Statements:
    """The broker's SQL for one vendor ("postgresql" or "sqlite")."""

    def __init__(self, vendor: str) -> None:
        from ..models import QueuedMessage

        self.pg = vendor == "postgresql"
        t = self.table = f'"{QueuedMessage._meta.db_table}"'
        self.columns = "queue_name, message_id, priority, available_at, payload, created_at, delivery_count"
        unclaimed = "(lease_owner IS NULL OR available_at <= %s)"
        self.stats = (
            "SELECT SUM(CASE WHEN available_at <= %s THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN available_at > %s AND lease_owner IS NULL THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN available_at > %s AND lease_owner IS NOT NULL THEN 1 ELSE 0 END) "
            f"FROM {t} WHERE queue_name = %s"
        )
        self.purge = f"DELETE FROM {t} WHERE queue_name = %s AND {unclaimed}"
        self.cancel_sql = f"DELETE FROM {t} WHERE message_id = %s AND {unclaimed}"
        # "{}" takes the id test (see _by_ids).
        self.delete_sql = f"DELETE FROM {t} WHERE lease_owner = %s AND id {{}}"
        self.lease_sql = f"UPDATE {t} SET {LEASE} WHERE id {{}}"
        self.max_params = 6000 if self.pg else 990

    # -- enqueue and inspect -------------------------------------------------------

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

    def cancel(self, message_id: str, queue_name: str | None, now: int) -> tuple[str, list[Any]]:
        if queue_name is None:
            return self.cancel_sql, [message_id, now]
        return self.cancel_sql + " AND queue_name = %s", [message_id, now, queue_name]

    # -- claim ----------------------------------------------------------------------

    def claim(
        self,
        cursor: Any,
        queue: str,
        owner: str,
        count: int,
        now: int,
        lease_end: int,
        acks: list[int],
        *,
        fresh_only: bool = False,
        next_due: bool = False,
    ) -> Claimed:
        """Delete the acked rows and lease up to ``count`` due ones to ``owner`` until
        ``lease_end``, counting a delivery. ``fresh_only``: skip messages already
        delivered ISOLATE_AFTER times. ``next_due``: PostgreSQL also tells, when short,
        when the queue's next row comes due, in the same round trip. On PostgreSQL it is
        one statement, which commits asynchronously (CLAIM_ASYNC_COMMIT)."""
        fresh = FRESH if fresh_only else ""
        # The due rows, claim order first, and what a claimed row is reported as: its
        # delivery count and old available_at once leased, so that both vendors' rows
        # sort the same.
        due = f"FROM {self.table} WHERE queue_name = %s AND available_at <= %s {fresh}{ORDER} LIMIT %s"
        select = [queue, now, count]
        lease = [owner, lease_end]
        if self.pg:
            acked, acked_params = "", []
            if acks:
                acked = f"acked AS ({self.delete_sql.format('= ANY(%s)')}), "
                acked_params = [owner, acks]
                # Every part of the statement sees the rows as they were before it: an acked
                # row whose lease ran out (acks wait out a database outage) would also be
                # due, and PostgreSQL applies only one of the DELETE and the UPDATE.
                due = (
                    f"FROM {self.table} WHERE queue_name = %s AND available_at <= %s {fresh}"
                    f"AND id <> ALL(%s) {ORDER} LIMIT %s"
                )
                select = [queue, now, acks, count]
            sql = (
                f"WITH {acked}claimed AS (SELECT id, available_at {due} FOR UPDATE SKIP LOCKED), "
                f"leased AS (UPDATE {self.table} AS m SET {LEASE} FROM claimed WHERE m.id = claimed.id "
                "RETURNING m.id, m.payload, m.delivery_count, m.priority, claimed.available_at) "
                f"SELECT * FROM leased {CLAIM_ASYNC_COMMIT}"
            )
            params = [*acked_params, *select, *lease]
            if next_due:
                # Evaluated only when the claim came up short (the gate is checked first).
                sql += (
                    " UNION ALL SELECT NULL, NULL, NULL, NULL, "
                    f"(SELECT MIN(available_at) FROM {self.table} WHERE queue_name = %s {fresh}"
                    "AND id NOT IN (SELECT id FROM claimed)) "
                    "WHERE (SELECT COUNT(*) FROM claimed) < %s"
                )
                params += [queue, count]
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        else:
            # Look before locking: an idle poll must not take the database's write lock.
            if not acks and not self._any_due(cursor, queue, now, fresh):
                return Claimed([])
            cursor.execute("BEGIN IMMEDIATE")
            try:
                self.delete(acks, owner, cursor)
                cursor.execute(
                    f"SELECT id, payload, delivery_count + 1, priority, available_at {due}", select
                )
                rows = cursor.fetchall()
                self._by_ids(cursor, self.lease_sql, lease, [r[0] for r in rows])
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        due_at = next((r[4] for r in rows if r[0] is None), None)
        # PostgreSQL's RETURNING has no order: restore the claim's.
        leased = sorted((r for r in rows if r[0] is not None), key=lambda r: (-r[3], r[4], r[0]))
        return Claimed([(r[0], r[1], r[2]) for r in leased], due_at)

    def _any_due(self, cursor: Any, queue: str, now: int, fresh: str) -> bool:
        cursor.execute(
            f"SELECT 1 FROM {self.table} WHERE queue_name = %s AND available_at <= %s {fresh}LIMIT 1",
            [queue, now],
        )
        return cursor.fetchone() is not None

    # -- settle ---------------------------------------------------------------------

    def delete(self, ids: list[int], owner: str, cursor: Any) -> None:
        """Acks and nacks: delete rows this owner holds."""
        self._by_ids(cursor, self.delete_sql, [owner], ids)

    def requeue(self, ids: list[int], owner: str, queue: str, now: int, cursor: Any) -> None:
        """Clear the lease, making the row due now; the delivery is not counted. On
        PostgreSQL, listeners of ``queue`` are notified if anything came back."""
        update = (
            f"UPDATE {self.table} SET lease_owner = NULL, available_at = %s, "
            "delivery_count = CASE WHEN delivery_count > 0 THEN delivery_count - 1 ELSE 0 END "
            "WHERE lease_owner = %s AND id {}"
        )
        if self.pg:
            update = (
                f"WITH r AS ({update} RETURNING 1) "
                "SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM r LIMIT 1) AS any_requeued"
            )
        self._by_ids(cursor, update, [now, owner], ids, [CHANNEL, queue] if self.pg else [])

    def renew(self, ids: list[int], owner: str, lease_end: int, cursor: Any) -> None:
        """The heartbeat: extend the lease of rows this owner holds."""
        update = f"UPDATE {self.table} SET available_at = %s WHERE lease_owner = %s AND id {{}}"
        self._by_ids(cursor, update, [lease_end, owner], ids)

    def _by_ids(
        self, cursor: Any, sql: str, params: list[Any], ids: list[int], after: list[Any] | None = None
    ) -> None:
        """Run ``sql`` for ``ids``: its ``{}`` becomes the id test, one array on
        PostgreSQL, ``IN`` lists of CHUNK ids on SQLite (bounded by its parameter limit)."""
        if not ids:
            return
        if self.pg:
            cursor.execute(sql.format("= ANY(%s)"), [*params, ids, *(after or [])])
            return
        for chunk in chunks(ids):
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(sql.format(f"IN ({marks})"), [*params, *chunk, *(after or [])])
