"""Crontab entries and their fire times: pure maths, no I/O.

``DJQUEUE["CRONTABS"]`` maps a name to an entry (see docs/scheduling.md). This module
validates entries and computes when they fire; the loop that sleeps and enqueues is in
scheduler.py.

Fire times are computed on the wall clock of the entry's time zone with croniter, then
mapped to instants with these daylight-saving rules:

- A schedule that runs every hour (its hour field covers all 24 hours, e.g. ``*/5 * * * *``)
  follows elapsed time: wall times skipped by a spring-forward transition do not happen,
  and wall times repeated by a fall-back transition fire in both passes.
- Any other schedule (a fixed hour, e.g. ``30 2 * * *``) fires once per matching wall time:
  a time skipped by a spring-forward transition fires at the transition itself (02:30 in
  Europe/Berlin on the last Sunday of March fires at 03:00 CEST), and a repeated time fires
  only in its first pass (01:30 in America/New_York on the first Sunday of November fires
  at 01:30 EDT, not again at 01:30 EST).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..brokers.base import validate_queue_name
from ..errors import ConfigurationError

CATCH_UP_LATEST = "latest"
CATCH_UP_SKIP = "skip"
CATCH_UP_CHOICES = (CATCH_UP_LATEST, CATCH_UP_SKIP)
ENTRY_KEYS = ("actor", "schedule", "args", "kwargs", "timezone", "queue_name", "enabled", "catch_up")
MAX_NAME_LENGTH = 200  # ScheduleRun.name

_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
# A fire time is searched segment by segment between UTC-offset changes; a schedule
# that crosses more transitions than this before matching is treated as never firing.
_MAX_SEGMENTS = 64


def _croniter() -> Any:
    # Imported on first use, not with this module: croniter's import runs ``file`` on the
    # Python binary (platform.architecture()) and weighs about 1 MB, which every process
    # that loads the admin would pay without ever computing a fire time.
    import croniter

    return croniter


class Problem(NamedTuple):
    """One thing wrong with an entry: the key at fault, what is wrong, how to fix it."""

    key: str
    message: str
    hint: str


class Schedule:
    """A croniter expression evaluated on the wall clock of ``zone``.

    Five fields (minute hour day-of-month month day-of-week), a sixth for seconds (last,
    as croniter reads it: ``* * * * * */10`` is every ten seconds), or an alias such as
    ``@daily``. Raises ConfigurationError for an expression croniter rejects.
    """

    def __init__(self, expression: str, zone: ZoneInfo) -> None:
        if not isinstance(expression, str) or not expression.strip():
            raise ConfigurationError(f"a schedule must be a crontab string, not {expression!r}")
        self.expression = " ".join(expression.split())
        self.zone = zone
        cron = _croniter()
        try:
            expanded = cron.croniter(self.expression, datetime(2000, 1, 1)).expanded
        except (cron.CroniterError, ValueError, TypeError, KeyError) as e:
            raise ConfigurationError(f"{self.expression!r} is not a valid crontab: {e}") from None
        hours = expanded[1]
        # Every-hour schedules follow elapsed time across DST transitions (module docstring).
        self.every_hour = hours == ["*"] or set(hours) >= set(range(24))

    def __repr__(self) -> str:
        return f"Schedule({self.expression!r}, {self.zone.key!r})"

    def _next_wall(self, wall: datetime, *, inclusive: bool) -> datetime:
        start = wall - _MICROSECOND if inclusive else wall
        cron = _croniter()
        try:
            return cron.croniter(self.expression, start).get_next(datetime)
        except cron.CroniterBadDateError:
            raise ConfigurationError(f"the schedule {self.expression!r} never fires") from None

    def _offset(self, instant: datetime) -> timedelta:
        return instant.astimezone(self.zone).utcoffset()  # type: ignore[return-value]

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after the aware datetime ``after``, in UTC.

        Returned in UTC because Python compares two datetimes of the same tzinfo by their
        wall time, which is wrong across a DST transition; convert for display only.
        Raises ConfigurationError if the schedule never fires again.
        """
        if after.tzinfo is None:
            raise ValueError("next_after() needs an aware datetime")
        t = after.astimezone(UTC)
        inclusive = False
        for _ in range(_MAX_SEGMENTS):
            # Within one segment of constant UTC offset, wall time and instants map one to one.
            offset = self._offset(t)
            wall = (t + offset).replace(tzinfo=None)
            candidate_wall = self._next_wall(wall, inclusive=inclusive)
            candidate = (candidate_wall - offset).replace(tzinfo=UTC)
            if self._offset(candidate) == offset:
                local = candidate.astimezone(self.zone)
                if local.fold and not self.every_hour:
                    # The second pass of a repeated wall time: fixed-hour schedules fired
                    # in the first pass, so go on from where the repetition ends.
                    t, inclusive = self._end_of_repeat(local), True
                    continue
                return candidate
            # The offset changes before the candidate: go on from that transition.
            transition = self._transition(t, candidate, offset)
            new_offset = self._offset(transition)
            if new_offset > offset and not self.every_hour:
                # Spring forward: wall times in [before, after) do not exist that day;
                # one that matches fires at the transition.
                gap_start = (transition + offset).replace(tzinfo=None)
                gap_end = (transition + new_offset).replace(tzinfo=None)
                if self._next_wall(gap_start, inclusive=True) < gap_end:
                    return transition
            t, inclusive = transition, True
        raise ConfigurationError(f"the schedule {self.expression!r} never fires")

    def _transition(self, lo: datetime, hi: datetime, offset: timedelta) -> datetime:
        """An instant in (lo, hi] where the UTC offset changes from ``offset`` (by bisection;
        transitions fall on whole seconds). With several transitions in between it may be a
        later one, which is harmless: croniter found no match before ``hi``."""
        lo_s = int(lo.timestamp())
        hi_s = int(hi.timestamp())
        while hi_s - lo_s > 1:
            mid = (lo_s + hi_s) // 2
            if self._offset(datetime.fromtimestamp(mid, UTC)) == offset:
                lo_s = mid
            else:
                hi_s = mid
        return datetime.fromtimestamp(hi_s, UTC)

    def _end_of_repeat(self, local: datetime) -> datetime:
        """The instant at which the repeated wall times around ``local`` (fold=1) end."""
        first = local.replace(fold=0).astimezone(UTC)
        first_offset = self._offset(first)
        transition = self._transition(first, local.astimezone(UTC), first_offset)
        return transition + (first_offset - self._offset(transition))

    def iter_after(self, after: datetime) -> Iterator[datetime]:
        """Fire times (UTC) after ``after``, in order, without end."""
        while True:
            after = self.next_after(after)
            yield after

    def latest_at_or_before(self, moment: datetime, *, after: datetime | None = None) -> datetime | None:
        """The last fire time (UTC) <= ``moment`` and > ``after`` (None: look back ~4 years).

        Returns None when there is none, e.g. nothing fired since ``after``.
        """
        moment = moment.astimezone(UTC)
        lo = after.astimezone(UTC) if after is not None else moment - timedelta(days=1500)
        hi = moment
        if not self._fires_in(lo, moment):
            return None
        # Bisect on time with next_after() alone, so that DST rules live in one place and
        # a dense schedule (every second) costs no more than a daily one: invariant, a
        # fire time lies in (lo, moment] and none in (hi, moment].
        while hi - lo > _SECOND:
            mid = lo + (hi - lo) / 2
            if self._fires_in(mid, moment):
                lo = mid
            else:
                hi = mid
        # Fire times fall on whole seconds, and (lo, lo + 1s] holds at most one.
        return self.next_after(lo)

    def _fires_in(self, start: datetime, end: datetime) -> bool:
        """Whether a fire time lies in (start, end]."""
        try:
            return self.next_after(start) <= end
        except ConfigurationError:  # it never fires again
            return False


@dataclass(frozen=True)
class CrontabEntry:
    """One validated entry of ``DJQUEUE["CRONTABS"]``."""

    name: str
    actor: str
    schedule: Schedule
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    queue_name: str | None = None
    enabled: bool = True
    catch_up: str = CATCH_UP_LATEST

    @classmethod
    def from_setting(cls, name: Any, value: Any, *, default_timezone: str) -> CrontabEntry:
        """Build an entry from its setting; raises ConfigurationError naming the entry."""
        problems = entry_problems(name, value, default_timezone=default_timezone)
        if problems:
            problem = problems[0]
            raise ConfigurationError(f"{describe_key(name, problem.key)} {problem.message} {problem.hint}")
        zone_name = value.get("timezone") or default_timezone
        return cls(
            name=name,
            actor=value["actor"],
            schedule=Schedule(value["schedule"], ZoneInfo(zone_name)),
            args=tuple(value.get("args", ())),
            kwargs=dict(value.get("kwargs", {})),
            timezone=zone_name,
            queue_name=value.get("queue_name"),
            enabled=value.get("enabled", True),
            catch_up=value.get("catch_up", CATCH_UP_LATEST),
        )

    @property
    def zone(self) -> ZoneInfo:
        return self.schedule.zone

    def next_fire_times(self, after: datetime, count: int = 5) -> list[datetime]:
        """The next ``count`` fire times after ``after``, in the entry's time zone (for display)."""
        times = []
        for fire_time in self.schedule.iter_after(after):
            times.append(fire_time.astimezone(self.zone))
            if len(times) == count:
                break
        return times


def describe_key(name: Any, key: str | None = None) -> str:
    """How a message names the setting at fault, e.g. DJQUEUE['CRONTABS']['nightly']['schedule']."""
    where = f"DJQUEUE['CRONTABS'][{name!r}]"
    return f"{where}[{key!r}]" if key in ENTRY_KEYS else where


def entry_problems(name: Any, value: Any, *, default_timezone: str) -> list[Problem]:
    """Everything wrong with one entry that can be told without importing the actor."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
        return [
            Problem(
                "name",
                f"is not a valid name: use a non-empty string of at most {MAX_NAME_LENGTH} characters.",
                "Name entries after what they do, e.g. 'nightly-report'.",
            )
        ]
    if not isinstance(value, Mapping):
        return [
            Problem(
                "entry",
                f"must be a dict, not {type(value).__name__}.",
                "Use {'actor': 'app.tasks.fn', 'schedule': '0 * * * *'}.",
            )
        ]
    problems = []
    unknown = sorted(str(k) for k in set(value) - set(ENTRY_KEYS))
    if unknown:
        problems.append(
            Problem(
                "keys",
                f"has unknown key(s) {', '.join(map(repr, unknown))}.",
                f"Known keys: {', '.join(ENTRY_KEYS)}.",
            )
        )
    actor = value.get("actor")
    if not isinstance(actor, str) or not actor.strip():
        problems.append(
            Problem(
                "actor",
                "is missing or empty." if actor is None else f"must be a string, not {actor!r}.",
                "Give the actor's name, which is its function's dotted path unless "
                "actor_name= says otherwise, e.g. 'shop.tasks.send_receipt'.",
            )
        )
    zone = None
    zone_name = value.get("timezone") or default_timezone
    try:
        zone = ZoneInfo(zone_name) if isinstance(zone_name, str) else None
    except (ZoneInfoNotFoundError, ValueError):
        zone = None
    if zone is None:
        problems.append(
            Problem(
                "timezone",
                f"{zone_name!r} is not a known time zone.",
                "Use an IANA name such as 'Europe/Berlin' or 'UTC' (on Windows: pip install tzdata).",
            )
        )
    expression = value.get("schedule")
    if expression is None:
        problems.append(Problem("schedule", "is missing.", "Add a crontab such as '30 2 * * *'."))
    else:
        try:
            schedule = Schedule(expression, zone or ZoneInfo("UTC"))
            schedule.next_after(datetime.now(UTC))
        except ConfigurationError as e:
            problems.append(
                Problem(
                    "schedule",
                    f"is wrong: {e}.",
                    "Use croniter syntax: 'minute hour day month weekday', an optional sixth "
                    "field for seconds ('* * * * * */10'), or '@daily'.",
                )
            )
    args = value.get("args", ())
    if not isinstance(args, list | tuple):
        problems.append(Problem("args", f"must be a list, not {type(args).__name__}.", "Use e.g. [1, 'a']."))
    kwargs = value.get("kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        problems.append(Problem("kwargs", "must be a dict with string keys.", "Use e.g. {'day': 'today'}."))
    queue_name = value.get("queue_name")
    if queue_name is not None:
        try:
            validate_queue_name(queue_name)
        except ConfigurationError as e:
            problems.append(
                Problem("queue_name", f"is wrong: {e}.", "Leave it out to use the actor's queue.")
            )
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        problems.append(Problem("enabled", f"must be True or False, not {enabled!r}.", "Use True or False."))
    catch_up = value.get("catch_up", CATCH_UP_LATEST)
    if catch_up not in CATCH_UP_CHOICES:
        problems.append(
            Problem(
                "catch_up",
                f"must be one of {', '.join(map(repr, CATCH_UP_CHOICES))}, not {catch_up!r}.",
                "'latest' (the default) fires the most recent tick missed while no scheduler ran; "
                "'skip' fires none.",
            )
        )
    return problems


def parse_entries(crontabs: Mapping[str, Any], *, default_timezone: str) -> list[CrontabEntry]:
    """Every entry of a CRONTABS setting, validated; raises ConfigurationError on the first bad one."""
    if not isinstance(crontabs, Mapping):
        raise ConfigurationError("DJQUEUE['CRONTABS'] must be a dict of name -> entry")
    return [
        CrontabEntry.from_setting(name, value, default_timezone=default_timezone)
        for name, value in crontabs.items()
    ]
