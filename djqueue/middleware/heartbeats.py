"""Heartbeats: let the admin dashboard see live workers and recent throughput.

Each worker process started by ``runworkers`` has this middleware. Messages are
counted in memory (a lock and two additions per message); a thread of its own writes,
every ``interval`` seconds, one ``WorkerHeartbeat`` row for the process and adds the
counts to the ``ThroughputMinute`` row of each minute they fell in. The row goes away
when the process stops; a process that dies leaves a row that stops being updated,
which the dashboard shows as dead.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from typing import Any

from .base import Middleware

logger = logging.getLogger("djqueue.heartbeats")

HEARTBEAT_INTERVAL = 5.0  # seconds between two writes
# Rows of workers not seen for this long are deleted; rows of minutes older than
# KEEP_MINUTES too. Any live worker does it, at most every CLEANUP_INTERVAL seconds.
FORGET_AFTER = dt.timedelta(hours=1)
KEEP_MINUTES = 24 * 60
CLEANUP_INTERVAL = 600.0


def worker_id() -> str:
    """How a worker process is named in heartbeats and task results: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeats(Middleware):
    """Writes the process's heartbeat and per-minute counts every ``interval`` s."""

    def __init__(self, *, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.interval = interval
        self.worker_id = worker_id()
        self._lock = threading.Lock()
        # minute (epoch seconds // 60) -> [processed, failed], not yet written
        self._pending: dict[int, list[int]] = {}
        self.processed = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: Any = None
        self._started_at = dt.datetime.now(dt.UTC)
        self._last_cleanup = 0.0

    # -- counting (the hot path) ------------------------------------------------------

    def _count(self, failed: bool) -> None:
        minute = int(time.time()) // 60
        with self._lock:
            counts = self._pending.get(minute)
            if counts is None:
                counts = self._pending[minute] = [0, 0]
            counts[0] += 1
            self.processed += 1
            if failed:
                counts[1] += 1
                self.failed += 1

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        self._count(exception is not None)

    def after_skip_message(self, broker: Any, message: Any) -> None:
        # A skipped message that is dead-lettered (too old, too many deliveries) failed;
        # one skipped for another reason was not processed.
        if message.failed:
            self._count(True)

    def after_nack(self, broker: Any, message: Any) -> None:
        # Bytes that did not decode and unknown actors never reach the process hooks.
        if message.decode_error is not None or message.actor_name not in broker.actors:
            self._count(True)

    # -- the heartbeat thread ---------------------------------------------------------

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self._worker = worker
        self._thread = threading.Thread(target=self._run, name="djqueue-heartbeat", daemon=True)
        self._thread.start()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            self.flush()
            from ..models import WorkerHeartbeat

            WorkerHeartbeat.objects.filter(worker_id=self.worker_id).delete()
        finally:
            _close_connections()

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:
                logger.warning("could not write the worker heartbeat", exc_info=True)
            finally:
                _close_connections()
            if self._stop.wait(self.interval):
                return

    def beat(self) -> None:
        """Write the heartbeat row and the pending counts now."""
        from ..models import WorkerHeartbeat

        self.flush()
        now = dt.datetime.now(dt.UTC)
        worker = self._worker
        values = {
            "queues": sorted(worker.consumers) if worker is not None else [],
            "threads": worker.worker_threads if worker is not None else 0,
            "in_progress": sum(1 for t in worker.workers if t.current is not None) if worker else 0,
            "processed": self.processed,
            "failed": self.failed,
            "last_seen": now,
        }
        updated = WorkerHeartbeat.objects.filter(worker_id=self.worker_id).update(**values)
        if not updated:
            host, _, pid = self.worker_id.rpartition(":")
            WorkerHeartbeat.objects.create(
                worker_id=self.worker_id, hostname=host, pid=int(pid), started_at=self._started_at, **values
            )
        if time.monotonic() - self._last_cleanup > CLEANUP_INTERVAL:
            self._last_cleanup = time.monotonic()
            self.cleanup(now)

    def flush(self) -> None:
        """Add the counts kept in memory to the ThroughputMinute rows."""
        from django.db import IntegrityError, router, transaction
        from django.db.models import F

        from ..models import ThroughputMinute

        with self._lock:
            pending, self._pending = self._pending, {}
        for minute, (processed, failed) in sorted(pending.items()):
            start = dt.datetime.fromtimestamp(minute * 60, tz=dt.UTC)
            increment = {"processed": F("processed") + processed, "failed": F("failed") + failed}
            try:
                if ThroughputMinute.objects.filter(minute=start).update(**increment):
                    continue
                try:
                    with transaction.atomic(using=router.db_for_write(ThroughputMinute)):
                        ThroughputMinute.objects.create(minute=start, processed=processed, failed=failed)
                except IntegrityError:
                    # Another process created the minute's row first.
                    ThroughputMinute.objects.filter(minute=start).update(**increment)
            except Exception:
                self._restore({m: c for m, c in pending.items() if m >= minute})
                raise

    def _restore(self, unwritten: dict[int, list[int]]) -> None:
        # The database was unavailable: keep the counts for the next beat.
        with self._lock:
            for minute, (processed, failed) in unwritten.items():
                counts = self._pending.setdefault(minute, [0, 0])
                counts[0] += processed
                counts[1] += failed

    def cleanup(self, now: dt.datetime) -> None:
        from ..models import ThroughputMinute, WorkerHeartbeat

        WorkerHeartbeat.objects.filter(last_seen__lt=now - FORGET_AFTER).delete()
        ThroughputMinute.objects.filter(minute__lt=now - dt.timedelta(minutes=KEEP_MINUTES)).delete()


def _close_connections() -> None:
    # This thread's own connections; honours CONN_MAX_AGE as a request would.
    from django.db import close_old_connections

    close_old_connections()
