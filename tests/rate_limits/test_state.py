"""The pure state transitions behind the memory and database backends, without a store."""

from __future__ import annotations

from djqueue.rate_limits import state


def run(step, calls):
    """Apply ``step(state, now)`` at each time in ``calls``; the admissions, in order."""
    current, admitted = None, []
    for now in calls:
        ok, current, _ = step(current, now)
        admitted.append(ok)
    return admitted


def test_semaphore_admits_up_to_the_limit_and_frees_on_release():
    s = None
    ok1, s, _ = state.semaphore_acquire(s, 0, "a", 2, 1000)
    ok2, s, _ = state.semaphore_acquire(s, 1, "b", 2, 1000)
    ok3, s, expires = state.semaphore_acquire(s, 2, "c", 2, 1000)
    assert (ok1, ok2, ok3) == (True, True, False)
    assert expires == 1001, "the row matters until the last slot expires"
    _, s, _ = state.semaphore_release(s, 3, "a")
    ok4, s, _ = state.semaphore_acquire(s, 4, "d", 2, 1000)
    assert ok4 and set(s) == {"b", "d"}


def test_semaphore_slot_of_a_dead_holder_expires():
    _, s, _ = state.semaphore_acquire(None, 0, "dead", 1, 500)
    assert not state.semaphore_acquire(s, 499, "x", 1, 500)[0]
    ok, s, _ = state.semaphore_acquire(s, 500, "x", 1, 500)
    assert ok and set(s) == {"x"}


def test_bucket_allows_a_burst_then_the_refill_rate():
    # 4 tokens per 1000 ms: a burst of 4, then one every 250 ms.
    def step(s, now):
        return state.bucket_take(s, now, 4, 1000)

    assert run(step, [0, 0, 0, 0, 0]) == [True] * 4 + [False]
    assert run(step, [0, 0, 0, 0, 249, 250, 251, 500]) == [True] * 4 + [False, True, False, True]


def test_bucket_does_not_fill_past_its_limit_or_drain_when_the_clock_steps_back():
    ok, s, full_at = state.bucket_take(None, 0, 2, 1000)
    assert ok and s["tokens"] == 1 and full_at == 500
    # A long pause refills to the limit, no more.
    assert run(lambda st, now: state.bucket_take(st, now, 2, 1000), [0, 10_000, 10_000, 10_000]) == [
        True,
        True,
        True,
        False,
    ]
    ok, s2, _ = state.bucket_take(s, -5000, 2, 1000)
    assert ok and s2["tokens"] == 0


def test_window_counts_admissions_of_the_last_window():
    def step(s, now):
        return state.window_add(s, now, 3, 1000)

    # 3 within any 1000 ms: the 4th waits until the first leaves the window.
    assert run(step, [0, 100, 200, 300, 999, 1000, 1001, 1100, 1200]) == [
        True,
        True,
        True,
        False,
        False,
        True,
        False,
        True,
        True,
    ]


def test_window_never_admits_more_than_the_limit_in_any_window():
    admitted_at = []
    s = None
    for now in range(0, 5000, 7):
        ok, s, _ = state.window_add(s, now, 5, 300)
        if ok:
            admitted_at.append(now)
    for i, start in enumerate(admitted_at):
        inside = [t for t in admitted_at[i:] if t < start + 300]
        assert len(inside) <= 5
    assert len(admitted_at) >= 5000 // 300 * 5 - 5
