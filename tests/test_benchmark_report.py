"""The benchmark report's target rows: a miss must never read as the goal."""

from __future__ import annotations

import pytest

from benchmarks.report import COLORS, SYSTEM_ORDER, against_goal, mebibytes


@pytest.mark.parametrize(
    ("value", "goal", "digits", "shown"),
    [
        (1.9997, 2.0, 2, "1.9997"),  # "2.00" beside "no" would hide the miss
        (4.96, 5, 1, "4.96"),
        (1.47, 1.5, 2, "1.47"),  # a plain miss needs no more digits
        (2.004, 2.0, 2, "2.00"),  # met: rounding down to the goal is still the goal
        (3.3217, 2.0, 2, "3.32"),
    ],
)
def test_a_target_s_ratio_is_never_rounded_into_its_goal(value, goal, digits, shown):
    assert against_goal(value, goal, digits) == shown


@pytest.mark.parametrize(
    ("mine", "theirs", "shown"),
    [
        (47.8, 47.7, "47.8 vs 47.7"),  # "48 vs 48" beside "no" would hide the difference
        (47.8, 30.1, "48 vs 30"),
        (48.0, 48.0, "48 vs 48"),
    ],
)
def test_memory_sizes_that_differ_never_show_as_one(mine, theirs, shown):
    assert mebibytes(mine, theirs) == shown


def test_every_system_has_its_own_colour_in_the_chart():
    assert len({COLORS[system] for system in SYSTEM_ORDER}) == len(SYSTEM_ORDER)
