"""The three limiters and unique keys on every backend: memory, SQLite, PostgreSQL, Redis."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from django.db import connections

from djqueue import RateLimitExceeded
from djqueue.errors import ConfigurationError
from djqueue.rate_limits import BucketRateLimiter, ConcurrentRateLimiter, WindowRateLimiter
from tests.process import wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


def key() -> str:
    return f"k-{uuid.uuid4().hex[:8]}"


def test_concurrent_admits_up_to_the_limit_and_releases(backend):
    limiter = ConcurrentRateLimiter(key(), 2, ttl=60_000, backend=backend)
    with limiter.acquire() as first:
        with limiter.acquire() as second:
            assert first is second is True
            with pytest.raises(RateLimitExceeded, match="at its limit of 2"), limiter.acquire():
                pytest.fail("a third holder got in")
            with limiter.acquire(raise_on_failure=False) as third:
                assert third is False
        with limiter.acquire() as again:
            assert again, "the released slot is free again"


def test_concurrent_slot_of_a_holder_that_never_released_expires(backend):
    name = key()
    dead = ConcurrentRateLimiter(name, 1, ttl=300, backend=backend)
    assert dead._acquire(), "taken and never released, as by a SIGKILLed worker"
    limiter = ConcurrentRateLimiter(name, 1, ttl=300, backend=backend)
    started = time.monotonic()
    assert not limiter._acquire()

    def free() -> bool:
        with limiter.acquire(raise_on_failure=False) as acquired:
            return acquired

    wait_for(free, timeout=5, interval=0.02, message="the dead holder's slot to expire")
    assert time.monotonic() - started >= 0.25


def test_concurrent_limit_holds_across_threads(backend):
    name, limit, threads, rounds = key(), 2, 8, 6
    lock = threading.Lock()
    state = {"now": 0, "max": 0, "ran": 0}

    def work() -> None:
        limiter = ConcurrentRateLimiter(name, limit, ttl=30_000, backend=backend)
        try:
            done = 0
            while done < rounds:
                with limiter.acquire(raise_on_failure=False) as acquired:
                    if not acquired:
                        time.sleep(0.002)
                        continue
                    with lock:
                        state["now"] += 1
                        state["max"] = max(state["max"], state["now"])
                    time.sleep(0.01)
                    with lock:
                        state["now"] -= 1
                        state["ran"] += 1
                    done += 1
        finally:
            connections.close_all()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert state["ran"] == threads * rounds
    assert state["max"] == limit, f"{state['max']} ran at once with a limit of {limit}"


def test_bucket_allows_a_burst_then_refills(backend):
    # 3 tokens per 1500 ms: a burst of 3, then one token every 500 ms.
    limiter = BucketRateLimiter(key(), 3, bucket=1500, backend=backend)
    first = time.monotonic()
    assert [limiter._acquire() for _ in range(4)] == [True, True, True, False]
    wait_for(limiter._acquire, timeout=5, interval=0.01, message="a token to come back")
    assert time.monotonic() - first >= 0.45
    with pytest.raises(RateLimitExceeded), limiter.acquire():
        pass


def test_window_admits_limit_per_sliding_window(backend):
    limiter = WindowRateLimiter(key(), 3, window=1000, backend=backend)
    first = time.monotonic()
    assert [limiter._acquire() for _ in range(4)] == [True, True, True, False]
    wait_for(limiter._acquire, timeout=5, interval=0.01, message="the window to slide")
    assert time.monotonic() - first >= 0.95


def test_window_limit_holds_across_threads(backend):
    limit, window = 5, 0.4
    limiter = WindowRateLimiter(key(), limit, window=int(window * 1000), backend=backend)
    admitted: list[tuple[float, float]] = []  # (before, after) the call that admitted
    lock = threading.Lock()
    stop = time.monotonic() + 0.6

    def hammer() -> None:
        try:
            while time.monotonic() < stop:
                before = time.monotonic()
                if limiter._acquire():
                    after = time.monotonic()
                    with lock:
                        admitted.append((before, after))
                time.sleep(0.005)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    admitted.sort()
    assert len(admitted) >= limit
    # The store admitted each call at some moment between its before and after. limit + 1
    # admissions that all fall inside one window would break the limit (stores count in
    # whole ms: allow 2 ms for that).
    for i in range(len(admitted) - limit):
        group = admitted[i : i + limit + 1]
        spread = max(after for _, after in group) - group[0][0]
        assert spread >= window - 0.002, f"{limit + 1} admissions within {spread:.4f}s"


def test_kinds_sharing_a_key_do_not_clash(backend):
    name = key()
    with ConcurrentRateLimiter(name, 1, backend=backend).acquire():
        assert BucketRateLimiter(name, 1, backend=backend)._acquire()
        assert WindowRateLimiter(name, 1, backend=backend)._acquire()


def test_long_keys_are_distinct(backend):
    base = "x" * 300
    first = ConcurrentRateLimiter(base + "a", 1, backend=backend)
    second = ConcurrentRateLimiter(base + "b", 1, backend=backend)
    with first.acquire(), second.acquire():
        assert not first._acquire()


def test_unique_keys(backend):
    name = "unique:" + key()
    assert backend.unique_holder(name) is None
    assert backend.unique_claim(name, "m1", ttl=60_000)
    assert backend.unique_claim(name, "m1", ttl=60_000), "the holder may refresh its claim"
    assert not backend.unique_claim(name, "m2", ttl=60_000)
    assert backend.unique_holder(name) == "m1"
    assert not backend.unique_release(name, "m2"), "only the holder frees a key"
    assert backend.unique_holder(name) == "m1"
    assert backend.unique_release(name, "m1")
    assert backend.unique_claim(name, "m2", ttl=60_000)
    assert backend.unique_release_owner("m2")
    assert backend.unique_holder(name) is None
    assert not backend.unique_release_owner("m2")


def test_unique_key_expires(backend):
    name = "unique:" + key()
    assert backend.unique_claim(name, "m1", ttl=200)
    assert not backend.unique_claim(name, "m2", ttl=200)
    wait_for(lambda: backend.unique_claim(name, "m2", ttl=60_000), timeout=5, interval=0.02)
    assert backend.unique_holder(name) == "m2"
    assert not backend.unique_release(name, "m1"), "the expired holder no longer frees it"


def test_unique_claim_is_exclusive_across_threads(backend):
    name = "unique:" + key()
    winners = []
    barrier = threading.Barrier(8)

    def claim(owner: str) -> None:
        try:
            barrier.wait(10)
            if backend.unique_claim(name, owner, ttl=60_000):
                winners.append(owner)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=claim, args=(f"m{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(winners) == 1
    assert backend.unique_holder(name) == winners[0]


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: ConcurrentRateLimiter("", 1), "non-empty string"),
        (lambda: ConcurrentRateLimiter("k", 0), "limit must be a positive"),
        (lambda: ConcurrentRateLimiter("k", 1, ttl=-1), "ttl must be a positive"),
        (lambda: BucketRateLimiter("k", 1, bucket=0), "bucket must be a positive"),
        (lambda: WindowRateLimiter("k", True), "limit must be a positive"),
        (lambda: WindowRateLimiter("k", 1, window=1.5), "window must be a positive"),
    ],
)
def test_bad_arguments_are_refused(make, error):
    with pytest.raises(ConfigurationError, match=error):
        make()
