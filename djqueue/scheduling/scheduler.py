"""The scheduler loop: fires ``DJQUEUE["CRONTABS"]`` on time, each tick exactly once.

Any number of schedulers may run side by side. Each firing is claimed by inserting a
``ScheduleRun`` row, unique on (name, fire_time): on a broker that enqueues inside
database transactions (``db://``) the row and the message commit together, so a tick is
enqueued exactly once even if a scheduler dies mid-way; on other brokers the row is
committed first and deleted again if the enqueue fails. The scheduler that loses the
insert skips the tick. Nothing is locked, so nothing can be left locked by a dead process.

The loop sleeps until the next fire time (no polling) and recomputes it from the clock
on waking, so it does not drift. Fire-time maths: crontab.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import import_module
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connections, router, transaction
from django.utils import timezone

from .. import conf
from ..errors import ActorNotFound, ConfigurationError
from .crontab import CATCH_UP_SKIP, CrontabEntry, parse_entries

if TYPE_CHECKING:
    from ..actor import Actor
    from ..brokers.base import Broker
    from ..message import Message

logger = logging.getLogger("djqueue.scheduler")

# How long ScheduleRun rows are kept; the latest row of each entry is always kept, as
# it tells a restarted scheduler which ticks it missed.
RUN_RETENTION = timedelta(days=7)
PRUNE_INTERVAL = timedelta(hours=1)
# A tick whose firing failed (database or broker down) is retried after 1, 2, 4 ... s.
MAX_RETRY_DELAY = 30.0


def default_timezone() -> str:
    return getattr(settings, "TIME_ZONE", None) or "UTC"


def load_entries(crontabs: Any = None) -> list[CrontabEntry]:
    """The entries of ``DJQUEUE["CRONTABS"]`` (or ``crontabs``); ConfigurationError if one is bad."""
    return parse_entries(
        conf.get("CRONTABS") if crontabs is None else crontabs, default_timezone=default_timezone()
    )


def resolve_actor(actor_name: str, broker: Broker | None = None) -> Actor:
    """The actor registered as ``actor_name``, else the Actor at that dotted path.

    Raises ActorNotFound saying why.
    """
    from ..actor import Actor
    from ..brokers import get_broker

    broker = broker or get_broker()
    found = broker.get_actor(actor_name)
    if found is not None:
        return found
    module_name, _, attribute = actor_name.rpartition(".")
    reason = "no @actor is registered with this name"
    if module_name:
        try:
            module = import_module(module_name)
        except ImportError as e:
            reason += f", and importing {module_name!r} failed: {e}"
        else:
            value = getattr(module, attribute, None)
            if isinstance(value, Actor):
                return value
            found = broker.get_actor(actor_name)  # importing may have registered it
            if found is not None:
                return found
            reason += f", and {module_name}.{attribute} is not an @actor"
    known = ", ".join(sorted(broker.actors)[:10]) or "none"
    raise ActorNotFound(f"unknown actor {actor_name!r}: {reason} (registered actors: {known})")


def _utc_now(clock: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(clock(), UTC)


def _to_db(value: datetime) -> datetime:
    return value if settings.USE_TZ else timezone.make_naive(value)


def _from_db(value: datetime) -> datetime:
    return (value if timezone.is_aware(value) else timezone.make_aware(value)).astimezone(UTC)


@dataclass
class _State:
    entry: CrontabEntry
    next_fire: datetime | None  # UTC; None once the schedule fires no more
    retry_at: datetime | None = None
    failures: int = 0

    @property
    def due_at(self) -> datetime | None:
        return self.retry_at or self.next_fire


def _next_after(entry: CrontabEntry, moment: datetime) -> datetime | None:
    try:
        return entry.schedule.next_after(moment)
    except ConfigurationError:
        # A schedule limited to past years (a seventh field) has fired its last tick.
        logger.info("%s: the schedule %r fires no more", entry.name, entry.schedule.expression)
        return None


class Scheduler:
    """Fires ``entries`` (default: the CRONTABS setting) on ``broker`` (default: the current one).

    ``clock`` returns seconds since the epoch (``time.time``); tests may pass another.
    """

    retention = RUN_RETENTION
    prune_interval = PRUNE_INTERVAL

    def __init__(
        self,
        entries: Iterable[CrontabEntry] | None = None,
        *,
        broker: Broker | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from ..brokers import get_broker
        from ..models import ScheduleRun

        self.broker = broker or get_broker()
        self.entries = list(load_entries() if entries is None else entries)
        self.clock = clock
        self.actors = {e.name: resolve_actor(e.actor, self.broker) for e in self.entries if e.enabled}
        alias = getattr(self.broker, "alias", None)
        # On a transactional broker the claim row must live in the broker's database so
        # that it commits with the message; elsewhere wherever the router puts it.
        self.transactional = bool(self.broker.supports_transactions and alias)
        self.alias: str = alias if self.transactional else router.db_for_write(ScheduleRun)
        self.started_at: datetime | None = None

    def now(self) -> datetime:
        return _utc_now(self.clock)

    # -- one firing -----------------------------------------------------------------

    def build_message(self, entry: CrontabEntry, fire_time: datetime) -> Message:
        actor = self.actors.get(entry.name) or resolve_actor(entry.actor, self.broker)
        options = {"queue_name": entry.queue_name} if entry.queue_name else {}
        message = actor.message_with_options(args=entry.args, kwargs=dict(entry.kwargs), **options)
        # Set after building: message_with_options() accepts only options a middleware knows.
        message.options["scheduled_at"] = fire_time.astimezone(entry.zone).isoformat()
        message.options["schedule"] = entry.name
        return message

    def fire(self, entry: CrontabEntry, fire_time: datetime) -> Message | None:
        """Claim the tick ``fire_time`` of ``entry`` and enqueue its message.

        Returns the message, or None when another scheduler already fired this tick.
        """
        from ..models import ScheduleRun

        message = self.build_message(entry, fire_time)
        runs = ScheduleRun.objects.using(self.alias)
        row = {
            "name": entry.name,
            "fire_time": _to_db(fire_time),
            "message_id": message.message_id,
            "enqueued_at": _to_db(self.now()),
        }
        if self.transactional:
            with transaction.atomic(using=self.alias):
                try:
                    with transaction.atomic(using=self.alias):
                        runs.create(**row)
                except IntegrityError:
                    logger.debug("%s @ %s was fired by another scheduler", entry.name, fire_time)
                    return None
                self.broker.enqueue(message)
        else:
            try:
                with transaction.atomic(using=self.alias):
                    run = runs.create(**row)
            except IntegrityError:
                logger.debug("%s @ %s was fired by another scheduler", entry.name, fire_time)
                return None
            try:
                self.broker.enqueue(message)
            except BaseException:
                # Give the tick back so that this or another scheduler can fire it.
                try:
                    runs.filter(pk=run.pk).delete()
                except Exception:
                    logger.exception("could not release the claim on %s @ %s", entry.name, fire_time)
                raise
        logger.info(
            "fired %s @ %s: %s (message %s)",
            entry.name,
            fire_time.astimezone(entry.zone).isoformat(),
            message,
            message.message_id,
        )
        return message

    def last_run(self, name: str) -> datetime | None:
        """The latest fire time (UTC) recorded for ``name`` by any scheduler."""
        from ..models import ScheduleRun

        value = (
            ScheduleRun.objects.using(self.alias)
            .filter(name=name)
            .order_by("-fire_time")
            .values_list("fire_time", flat=True)
            .first()
        )
        return None if value is None else _from_db(value)

    def catch_up(self, entry: CrontabEntry, now: datetime) -> Message | None:
        """Apply the entry's catch-up policy to ticks missed while no scheduler ran.

        Missed ticks are those after the entry's last ScheduleRun and at or before
        ``now``; an entry that never fired has none. ``"latest"`` fires the most recent
        one once; ``"skip"`` fires none.
        """
        last = self.last_run(entry.name)
        if last is None:
            return None
        missed = entry.schedule.latest_at_or_before(now, after=last)
        if missed is None:
            return None
        local = missed.astimezone(entry.zone).isoformat()
        if entry.catch_up == CATCH_UP_SKIP:
            logger.info("%s: skipping the ticks missed since %s (catch_up='skip')", entry.name, last)
            return None
        logger.info("%s: catching up the tick of %s, missed while no scheduler ran", entry.name, local)
        return self.fire(entry, missed)

    def prune(self, now: datetime) -> int:
        """Delete ScheduleRun rows older than ``retention``, keeping each name's latest."""
        from ..models import ScheduleRun

        runs = ScheduleRun.objects.using(self.alias)
        cutoff = _to_db(now - self.retention)
        deleted = 0
        for name in runs.filter(fire_time__lt=cutoff).values_list("name", flat=True).distinct():
            latest = runs.filter(name=name).order_by("-fire_time").values_list("pk", flat=True).first()
            deleted += runs.filter(name=name, fire_time__lt=cutoff).exclude(pk=latest).delete()[0]
        return deleted

    # -- the loop -------------------------------------------------------------------

    def run(
        self,
        stop_event: threading.Event | None = None,
        *,
        max_sleep: float = 60.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Fire ticks until ``stop_event`` is set (or ``should_stop()`` returns True).

        Sleeps until the next fire time, at most ``max_sleep`` seconds at a time so that
        a jump of the system clock or ``should_stop`` is noticed.
        """
        stop = stop_event or threading.Event()
        now = self.started_at = self.now()
        active = [e for e in self.entries if e.enabled]
        logger.info(
            "scheduler started at %s: %d entries (%d disabled), claims in database %r",
            now.isoformat(),
            len(active),
            len(self.entries) - len(active),
            self.alias,
        )
        try:
            states = [self._start(entry, now) for entry in active]
            next_prune = now
            while not stop.is_set() and not (should_stop and should_stop()):
                now = self.now()
                if now >= next_prune:
                    self._prune_safely(now)
                    next_prune = now + self.prune_interval
                pending = [(s.due_at, s) for s in states if s.due_at is not None]
                due = [s for at, s in pending if at <= now]
                if due:
                    close_old_connections()
                    for state in due:
                        self._handle(state, now)
                    continue
                wake = min([at for at, _ in pending] + [next_prune])
                stop.wait(min((wake - now).total_seconds(), max_sleep))
        finally:
            for connection in connections.all(initialized_only=True):
                connection.close()
        logger.info("scheduler stopped")

    def _start(self, entry: CrontabEntry, now: datetime) -> _State:
        try:
            self.catch_up(entry, now)
        except Exception:
            logger.exception("%s: catching up failed", entry.name)
        return _State(entry, _next_after(entry, now))

    def _handle(self, state: _State, now: datetime) -> None:
        entry = state.entry
        tick = state.next_fire
        if tick is None:
            return
        following = _next_after(entry, tick)
        if following is not None and following <= now:
            # Fell behind (the machine slept, the database was down): fire the latest
            # due tick once rather than a burst of stale ones.
            latest = entry.schedule.latest_at_or_before(now, after=tick) or tick
            logger.warning(
                "%s: the ticks from %s to %s are late; firing only the latest",
                entry.name,
                tick.astimezone(entry.zone).isoformat(),
                latest.astimezone(entry.zone).isoformat(),
            )
            tick, following = latest, _next_after(entry, latest)
        try:
            self.fire(entry, tick)
        except Exception:
            state.failures += 1
            delay = min(2.0 ** (state.failures - 1), MAX_RETRY_DELAY)
            logger.exception("%s: firing the tick of %s failed; retrying in %.0fs", entry.name, tick, delay)
            state.next_fire, state.retry_at = tick, now + timedelta(seconds=delay)
            close_old_connections()
            return
        state.failures, state.retry_at, state.next_fire = 0, None, following

    def _prune_safely(self, now: datetime) -> None:
        try:
            deleted = self.prune(now)
        except Exception:
            logger.exception("pruning old schedule runs failed")
            return
        if deleted:
            logger.info("pruned %d schedule runs older than %s", deleted, self.retention)


def format_listing(entries: Iterable[CrontabEntry], now: datetime, count: int = 5) -> str:
    """What ``runscheduler --list`` prints: each entry and its next ``count`` fire times."""
    lines = []
    for entry in entries:
        state = "" if entry.enabled else " (disabled)"
        lines.append(
            f"{entry.name}{state}: {entry.actor} | {entry.schedule.expression} | {entry.timezone} | "
            f"catch_up={entry.catch_up}"
        )
        lines.extend(f"    {t.isoformat()}" for t in entry.next_fire_times(now, count))
    return "\n".join(lines) if lines else "no crontabs: DJQUEUE['CRONTABS'] is empty"


def run_scheduler(
    stop_event: threading.Event,
    *,
    should_stop: Callable[[], bool] | None = None,
    max_sleep: float = 60.0,
) -> None:
    """Run the scheduler from settings until ``stop_event`` is set; for a thread or process."""
    Scheduler().run(stop_event, should_stop=should_stop, max_sleep=max_sleep)


def install_signal_handlers(stop_event: threading.Event) -> None:
    """SIGTERM/SIGINT stop gracefully; a second one exits at once (code 2)."""

    def on_signal(signum: int, frame: Any) -> None:
        if stop_event.is_set():
            os._exit(2)
        logger.info("signal %d: stopping (a second one forces)", signum)
        stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def scheduler_process_main(
    log_file: str | None = None, log_level: str = "INFO", supervisor_pid: int | None = None
) -> None:
    """Entry point of the scheduler process of ``runworkers --scheduler`` ('spawn' method).

    SIGTERM stops it; SIGINT and SIGHUP are ignored (the supervisor forwards them as
    SIGTERM). It stops by itself within a second if the supervisor disappears.
    """
    # Known before Django is set up: a supervisor killed meanwhile must still be noticed.
    parent = supervisor_pid or os.getppid()
    stop = threading.Event()
    install_signal_handlers(stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    import django

    django.setup()
    from ..supervisor import configure_logging

    configure_logging(log_file, log_level)
    try:
        run_scheduler(stop, should_stop=lambda: os.getppid() != parent, max_sleep=1.0)
    except Exception:
        logger.exception("the scheduler failed")
        sys.exit(3)
    sys.exit(0)
