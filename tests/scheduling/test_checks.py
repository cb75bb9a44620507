"""System checks djqueue.E010-E019 and W005 on DJQUEUE["CRONTABS"]."""

from __future__ import annotations

import json

import pytest
from django.core import checks
from django.test import override_settings

from djqueue.scheduling.checks import check_crontabs
from tests.process import run_django

GOOD = {"actor": "record", "schedule": "*/5 * * * *"}


def run_checks(crontabs) -> list:
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", "CRONTABS": crontabs}):
        return check_crontabs()


@pytest.mark.parametrize(
    ("entry", "expected", "fragment"),
    [
        ([1, 2], "djqueue.E010", "['job'] must be a dict"),
        ({**GOOD, "shedule": "* * * * *"}, "djqueue.E011", "unknown key(s) 'shedule'"),
        ({"actor": "record"}, "djqueue.E012", "['job']['schedule'] is missing"),
        ({**GOOD, "schedule": "61 * * * *"}, "djqueue.E012", "out of range"),
        ({**GOOD, "schedule": "0 0 31 4 *"}, "djqueue.E012", "never fires"),
        ({**GOOD, "actor": "no.such.actor"}, "djqueue.E013", "unknown actor 'no.such.actor'"),
        ({**GOOD, "actor": "tests.testapp.tasks.os"}, "djqueue.E013", "is not an @actor"),
        ({"schedule": "* * * * *"}, "djqueue.E013", "['job']['actor'] is missing"),
        ({**GOOD, "timezone": "Europe/Atlantis"}, "djqueue.E014", "'Europe/Atlantis' is not a known"),
        ({**GOOD, "args": "x"}, "djqueue.E015", "['job']['args'] must be a list"),
        ({**GOOD, "kwargs": {"nope": 1}}, "djqueue.E015", "unexpected keyword argument 'nope'"),
        ({**GOOD, "args": [1, 2, 3]}, "djqueue.E015", "too many positional arguments"),
        ({**GOOD, "args": [{1, 2}]}, "djqueue.E015", "cannot be encoded"),
        ({**GOOD, "queue_name": "no spaces"}, "djqueue.E016", "invalid queue name"),
        ({**GOOD, "catch_up": "all"}, "djqueue.E017", "must be one of 'latest', 'skip'"),
        ({**GOOD, "enabled": "yes"}, "djqueue.E018", "must be True or False"),
    ],
)
def test_a_bad_entry_is_reported_with_its_id_and_name(entry, expected, fragment):
    errors = run_checks({"job": entry})
    assert [e.id for e in errors] == [expected], errors
    assert "DJQUEUE['CRONTABS']['job']" in errors[0].msg
    assert fragment in errors[0].msg
    assert errors[0].hint


@pytest.mark.parametrize("schedule", ["*/10 * * * * *", "0 9 * * 1 *"])
def test_a_sixth_field_of_star_is_warned_about(schedule):
    # Seconds last, as croniter reads them: every second of each minute that matches.
    (warning,) = run_checks({"job": {**GOOD, "schedule": schedule}})
    assert (warning.id, warning.level) == ("djqueue.W005", checks.WARNING)
    assert f"['job']['schedule'] {schedule!r} fires every second" in warning.msg
    seconds_last = " ".join([*schedule.split()[1:], schedule.split()[0]])
    assert repr(seconds_last) in warning.hint


@pytest.mark.parametrize(
    "schedule", ["* * * * * */10", "* * * * * */1", "0 0 * * * 0", "@hourly", "* * * * *"]
)
def test_seconds_given_last_pass(schedule):
    assert run_checks({"job": {**GOOD, "schedule": schedule}}) == []


def test_a_bad_name_is_reported():
    assert [e.id for e in run_checks({"": GOOD, "x" * 201: GOOD})] == ["djqueue.E010", "djqueue.E010"]


def test_every_problem_of_an_entry_is_reported():
    errors = run_checks({"job": {"actor": "record", "schedule": "x", "timezone": "Nowhere", "enabled": 1}})
    assert sorted(e.id for e in errors) == ["djqueue.E012", "djqueue.E014", "djqueue.E018"]


def test_good_entries_pass():
    crontabs = {
        "by-name": {**GOOD, "args": ["v"], "timezone": "Europe/Berlin", "catch_up": "skip"},
        "by-dotted-path": {
            "actor": "tests.scheduling.schedapp.tasks.report",
            "schedule": "30 2 * * * 15",
            "args": ["today"],
            "kwargs": {"verbose": True},
            "queue_name": "reports",
            "enabled": False,
        },
        "alias": {"actor": "record", "schedule": "@daily"},
    }
    assert run_checks(crontabs) == []


def test_manage_py_check_fails_for_a_bad_entry():
    # A fresh process: the checks must be registered by djqueue itself.
    crontabs = {"nightly": {"actor": "sched.tick", "schedule": "30 25 * * *"}}
    result = run_django(
        "check", settings="tests.scheduling.settings", DJQUEUE_TEST_CRONTABS=json.dumps(crontabs)
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "djqueue.E012" in result.stderr
    assert "DJQUEUE['CRONTABS']['nightly']['schedule']" in result.stderr
