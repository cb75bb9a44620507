"""Fire-time maths, with no server: DST transitions in two zones, seconds, look-backs."""

from __future__ import annotations

import itertools
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from djqueue.errors import ConfigurationError
from djqueue.scheduling.crontab import CrontabEntry, Schedule, parse_entries
from tests.process import ROOT

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def fires_between(expression: str, zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """Fire times in [start, end), in UTC (differences of same-zone datetimes are wall-clock)."""
    schedule = Schedule(expression, zone)
    times = []
    for fire_time in schedule.iter_after(start - timedelta(microseconds=1)):
        if fire_time >= end:
            return times
        times.append(fire_time)
    raise AssertionError("unreachable")


def local_day(zone: ZoneInfo, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, day, tzinfo=zone)
    end = datetime(year, month, day, tzinfo=zone) + timedelta(days=1)  # wall-clock midnight
    return start.astimezone(UTC), end.astimezone(UTC)


# (zone, spring-forward day, fall-back day); both zones change at 02:00 local time
# (Berlin 02:00 -> 03:00 and 03:00 -> 02:00; New York 02:00 -> 03:00 and 02:00 -> 01:00).
ZONES = [
    pytest.param(BERLIN, (2024, 3, 31), (2024, 10, 27), id="Europe/Berlin"),
    pytest.param(NEW_YORK, (2024, 3, 10), (2024, 11, 3), id="America/New_York"),
]


@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_a_skipped_time_fires_once_at_the_transition(zone, spring, fall):
    start, end = local_day(zone, *spring)
    times = fires_between("30 2 * * *", zone, start, end)
    assert [t.astimezone(zone).isoformat() for t in times] == [
        datetime(*spring, 3, 0, tzinfo=zone).isoformat()
    ]
    # The next day is back to 02:30.
    after = Schedule("30 2 * * *", zone).next_after(times[0]).astimezone(zone)
    next_day = datetime(*spring) + timedelta(days=1)
    assert (after.date(), after.hour, after.minute) == (next_day.date(), 2, 30)


@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_a_repeated_time_fires_once_in_the_first_pass(zone, spring, fall):
    start, end = local_day(zone, *fall)
    hour = 2 if zone is BERLIN else 1  # the repeated hour
    times = fires_between(f"30 {hour} * * *", zone, start, end)
    assert len(times) == 1
    first_pass = datetime(*fall, hour, 30, tzinfo=zone, fold=0)
    assert times[0] == first_pass.astimezone(UTC)
    assert times[0].astimezone(zone).fold == 0
    assert first_pass.utcoffset() > first_pass.replace(fold=1).utcoffset(), "the earlier of the two"


@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_fixed_times_outside_the_transition_are_unaffected(zone, spring, fall):
    for day in (spring, fall):
        start, end = local_day(zone, *day)
        times = fires_between("15 4,23 * * *", zone, start, end)
        assert [(t.astimezone(zone).hour, t.astimezone(zone).minute) for t in times] == [(4, 15), (23, 15)]


@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_every_hour_schedules_follow_elapsed_time(zone, spring, fall):
    start, end = local_day(zone, *spring)
    times = fires_between("30 * * * *", zone, start, end)
    assert len(times) == 23, "a 23-hour day"
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(times))
    start, end = local_day(zone, *fall)
    times = fires_between("30 * * * *", zone, start, end)
    assert len(times) == 25, "a 25-hour day: the repeated hour fires in both passes"
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(times))


@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_frequent_schedules_have_no_hole_or_burst_across_transitions(zone, spring, fall):
    for day in (spring, fall):
        start, end = local_day(zone, *day)
        times = fires_between("*/15 * * * *", zone, start, end)
        gaps = {(b - a) for a, b in itertools.pairwise(times)}
        assert gaps == {timedelta(minutes=15)}


@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_seconds_schedule_through_the_repeated_hour(zone, spring, fall):
    hour = 2 if zone is BERLIN else 1
    schedule = Schedule(f"0 {hour} * * * */20", zone)  # fixed hour: first pass only
    start = datetime(*fall, hour, 59, 30, tzinfo=zone, fold=0)
    times = [t.astimezone(zone) for t in _take(schedule.iter_after(start), 3)]
    # 59:40 and 59:50 do not match minute 0; the next is the next day's hour.
    assert [(t.day, t.hour, t.minute, t.second) for t in times] == [
        (fall[2] + 1, hour, 0, 0),
        (fall[2] + 1, hour, 0, 20),
        (fall[2] + 1, hour, 0, 40),
    ]


def test_seconds_in_a_sixth_field():
    schedule = Schedule("* * * * * */2", ZoneInfo("UTC"))
    start = datetime(2024, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    times = _take(schedule.iter_after(start), 4)
    assert [t.second for t in times] == [2, 4, 6, 8]
    assert all(t.microsecond == 0 for t in times)
    # Strictly after: a tick is not returned again for its own instant.
    assert schedule.next_after(times[0]) == times[1]


def _oracle(expression: str, zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The documented rules by brute force, minute by minute in UTC (minute schedules with
    '*' day fields only): an independent check of Schedule's segment arithmetic."""
    minutes, hours = (set(f) for f in croniter(expression).expanded[:2])
    every_hour = hours == {"*"}

    def matches(wall: datetime) -> bool:
        return ("*" in minutes or wall.minute in minutes) and (every_hour or wall.hour in hours)

    times = []
    instant = start
    while instant < end:
        wall = instant.astimezone(zone)
        if matches(wall) and (every_hour or wall.fold == 0):
            times.append(instant)
        following = instant + timedelta(minutes=1)
        jump = following.astimezone(zone).utcoffset() - wall.utcoffset()
        if jump > timedelta(0) and not every_hour:
            # Spring forward: a skipped wall time that matches fires at the transition.
            skipped = [
                wall.replace(tzinfo=None) + timedelta(minutes=m + 1) for m in range(jump.seconds // 60)
            ]
            if any(matches(w) for w in skipped):
                times.append(following)
        instant = following
    return sorted(set(times))


EXPRESSIONS = ["30 2 * * *", "0,30 1-3 * * *", "15 1 * * *", "*/20 * * * *", "@hourly", "45 0-23/2 * * *"]


@pytest.mark.parametrize("expression", EXPRESSIONS)
@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_fire_times_match_the_rules_by_brute_force(expression, zone, spring, fall):
    for day in (spring, fall):
        start, end = local_day(zone, *day)
        assert fires_between(expression, zone, start, end) == _oracle(expression, zone, start, end)


@pytest.mark.parametrize(("zone", "spring", "fall"), ZONES)
def test_look_ahead_and_look_back_agree_around_transitions(zone, spring, fall):
    for day in (spring, fall):
        base = datetime(*day, tzinfo=zone).astimezone(UTC)
        for expression in ("30 2 * * *", "*/20 * * * *", "0 * * * * */30"):
            schedule = Schedule(expression, zone)
            for minutes in range(0, 5 * 60, 11):
                start = base + timedelta(minutes=minutes, seconds=13)
                following = schedule.next_after(start)
                assert following.tzinfo is UTC and following > start
                assert schedule.latest_at_or_before(following, after=start) == following
                assert schedule.latest_at_or_before(following - timedelta(seconds=1), after=start) is None


def test_latest_at_or_before():
    schedule = Schedule("0 3 * * *", BERLIN)
    moment = datetime(2024, 1, 10, 12, tzinfo=BERLIN)
    assert schedule.latest_at_or_before(moment) == datetime(2024, 1, 10, 3, tzinfo=BERLIN)
    assert schedule.latest_at_or_before(moment, after=datetime(2024, 1, 10, 3, tzinfo=BERLIN)) is None
    assert schedule.latest_at_or_before(moment, after=datetime(2024, 1, 2, tzinfo=BERLIN)) == datetime(
        2024, 1, 10, 3, tzinfo=BERLIN
    )
    # Dense schedules are as quick: no walking of every second.
    dense = Schedule("* * 3 * * *", BERLIN)
    assert dense.latest_at_or_before(moment) == datetime(2024, 1, 3, 23, 59, 59, tzinfo=BERLIN)
    # In the second pass of New York's repeated hour, an every-hour schedule's latest
    # tick is that pass's own, not the first pass's.
    hourly = Schedule("30 * * * *", NEW_YORK)
    second_pass = datetime(2024, 11, 3, 1, 45, tzinfo=NEW_YORK, fold=1)
    latest = hourly.latest_at_or_before(second_pass)
    assert latest == datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK, fold=1).astimezone(UTC)


def test_aliases_and_invalid_expressions():
    assert Schedule("@daily", BERLIN).next_after(datetime(2024, 1, 1, 12, tzinfo=BERLIN)) == datetime(
        2024, 1, 2, tzinfo=BERLIN
    )
    for bad in ["61 * * * *", "* * * *", "not a crontab", "", "H * * * *"]:
        with pytest.raises(ConfigurationError):
            Schedule(bad, BERLIN)
    with pytest.raises(ConfigurationError, match="never fires"):
        Schedule("0 0 30 2 *", BERLIN).next_after(datetime(2024, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError):
        Schedule("@daily", BERLIN).next_after(datetime(2024, 1, 1))


def test_entries_from_settings():
    entries = parse_entries(
        {
            "nightly": {
                "actor": "shop.tasks.report",
                "schedule": "30 2 * * *",
                "args": [1],
                "kwargs": {"a": 2},
            },
            "often": {
                "actor": "tick",
                "schedule": "* * * * * */10",
                "timezone": "America/New_York",
                "queue_name": "fast",
                "enabled": False,
                "catch_up": "skip",
            },
        },
        default_timezone="Europe/Berlin",
    )
    nightly, often = entries
    assert (nightly.name, nightly.args, nightly.kwargs, nightly.timezone) == (
        "nightly",
        (1,),
        {"a": 2},
        "Europe/Berlin",
    )
    assert (nightly.queue_name, nightly.enabled, nightly.catch_up) == (None, True, "latest")
    assert (often.zone, often.queue_name, often.enabled, often.catch_up) == (NEW_YORK, "fast", False, "skip")
    upcoming = nightly.next_fire_times(datetime(2024, 3, 30, 12, tzinfo=UTC), 2)
    assert [t.isoformat() for t in upcoming] == ["2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"schedule": "* * * * *"}, "['actor'] is missing"),
        ({"actor": "a", "schedule": "* * *"}, "['schedule'] is wrong"),
        (
            {"actor": "a", "schedule": "* * * * *", "timezone": "Mars/Olympus"},
            "'Mars/Olympus' is not a known",
        ),
        ({"actor": "a", "schedule": "* * * * *", "shedule": "x"}, "unknown key(s) 'shedule'"),
        ({"actor": "a", "schedule": "* * * * *", "catch_up": "all"}, "['catch_up'] must be one of"),
    ],
)
def test_a_bad_entry_names_itself(value, fragment):
    with pytest.raises(ConfigurationError) as info:
        CrontabEntry.from_setting("job", value, default_timezone="UTC")
    assert "DJQUEUE['CRONTABS']['job']" in str(info.value)
    assert fragment in str(info.value)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_croniter_is_imported_only_when_a_fire_time_is_computed():
    # The admin imports the crontab module in every web process; croniter's import runs a
    # program (`file`) and weighs about 1 MB, so it must wait for the first schedule.
    code = (
        "import sys; from datetime import UTC, datetime; "
        "from django.conf import settings; "
        "settings.configure(INSTALLED_APPS=['django.contrib.contenttypes', 'django.contrib.auth', "
        "'django.contrib.admin', 'django.contrib.sessions', 'django.contrib.messages', 'djqueue'], "
        "DATABASES={'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}}, "
        "DJQUEUE={'BROKER_URL': 'stub://'}); "
        "import django; django.setup(); import djqueue.admin; "
        "from zoneinfo import ZoneInfo; from djqueue.scheduling.crontab import Schedule; "
        "print('croniter' in sys.modules); "
        "print(Schedule('0 3 * * *', ZoneInfo('UTC'))"
        ".next_after(datetime(2024, 1, 1, tzinfo=UTC)).isoformat()); "
        "print('croniter' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "2024-01-01T03:00:00+00:00", "True"]
