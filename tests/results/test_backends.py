"""The results backends, against the real database and Redis."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from djqueue import ResultFailure, ResultMissing, ResultTimeout
from djqueue.message import Message
from djqueue.models import TaskResult
from djqueue.results import backend_from_setting, get_result_backend
from djqueue.results.base import ResultBackend

from .conftest import make_backend

pytestmark = pytest.mark.django_db(transaction=True)


def message(**options: Any) -> Message:
    return Message(queue_name="default", actor_name="add", args=(1, 2), kwargs={}, options=options)


def test_a_stored_value_is_returned(result_backend):
    m = message()
    result_backend.store_result(m, {"total": 3, "items": [1, "two", None]})
    assert m.get_result() == {"total": 3, "items": [1, "two", None]}
    assert result_backend.get_result(m.message_id) == {"total": 3, "items": [1, "two", None]}


def test_nothing_stored_is_missing_or_times_out(result_backend):
    m = message()
    with pytest.raises(ResultMissing, match=m.message_id):
        m.get_result()
    start = time.monotonic()
    with pytest.raises(ResultTimeout):
        m.get_result(block=True, timeout=300)
    assert 0.25 < time.monotonic() - start < 2


def test_a_failure_raises_with_type_and_message(result_backend):
    m = message()
    result_backend.store_failure(m, "ValueError", "bad value 7")
    with pytest.raises(ResultFailure) as excinfo:
        m.get_result(block=True, timeout=1000)
    assert excinfo.value.exception_type == "ValueError"
    assert excinfo.value.exception_message == "bad value 7"


def test_a_blocked_caller_wakes_when_the_result_arrives(result_backend):
    m = message()

    def store_later() -> None:
        time.sleep(0.3)
        result_backend.store_result(m, 42)
        connections.close_all()

    thread = threading.Thread(target=store_later)
    thread.start()
    start = time.monotonic()
    assert m.get_result(block=True, timeout=5000) == 42
    elapsed = time.monotonic() - start
    thread.join()
    assert 0.25 < elapsed < 1.0


def test_several_waiters_all_wake(result_backend):
    m = message()
    got: list[Any] = []

    def wait() -> None:
        got.append(m.get_result(block=True, timeout=5000))
        connections.close_all()

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    result_backend.store_result(m, "done")
    for thread in threads:
        thread.join(6)
    assert got == ["done"] * 3


def test_waiting_on_the_database_polls_a_few_times_a_second():
    backend = make_backend("db")
    with CaptureQueriesContext(connection) as queries, pytest.raises(ResultTimeout):
        backend.get_result(message(), block=True, timeout=2000)
    # 50 ms growing to 250 ms: about 11 reads in two seconds, never a busy loop.
    assert 5 <= len(queries) <= 14, len(queries)


def test_an_expired_result_is_gone(result_backend):
    m = message()
    result_backend.store_result(m, "soon gone", ttl=100)
    assert m.get_result() == "soon gone"
    time.sleep(0.25)
    with pytest.raises(ResultMissing):
        m.get_result()


def test_storing_again_replaces_the_result(result_backend):
    m = message()
    result_backend.store_failure(m, "RuntimeError", "first try")
    result_backend.store_result(m, "second try")
    assert m.get_result() == "second try"


def test_group_members_count_once_each(result_backend):
    group_id = "6b0c3c3e-7f0e-4a39-9d59-8d1b1f7b0c01"
    members = [message(group_id=group_id) for _ in range(3)]
    for m in members:
        result_backend.store_result(m, 1)
    # A member delivered twice (at-least-once) stores again but still counts once.
    result_backend.store_result(members[0], 1)
    result_backend.store_failure(message(group_id=group_id), "ValueError", "failures do not count")
    assert result_backend.count_group_completed(group_id) == 3
    assert result_backend.count_group_completed("another-group") == 0


def test_run_once_runs_once_among_racing_threads(result_backend):
    calls: list[int] = []
    barrier = threading.Barrier(6)
    outcomes: list[bool] = []

    def race() -> None:
        barrier.wait()
        try:
            outcomes.append(result_backend.run_once("group:race", 60_000, lambda: calls.append(1)))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=race) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == [1]
    assert sorted(outcomes) == [False] * 5 + [True]


def test_run_once_releases_the_claim_when_the_callable_fails(result_backend):
    def fail() -> None:
        raise RuntimeError("broker down")

    with pytest.raises(RuntimeError):
        result_backend.run_once("group:retry-me", 60_000, fail)
    calls: list[int] = []
    assert result_backend.run_once("group:retry-me", 60_000, lambda: calls.append(1))
    assert calls == [1]


def test_database_purge_deletes_only_expired_rows_in_batches():
    backend = make_backend("db")
    for n in range(25):
        backend.store_result(message(), n, ttl=1)
    keep = message()
    backend.store_result(keep, "kept", ttl=60_000)
    time.sleep(0.01)
    with CaptureQueriesContext(connection) as queries:
        assert backend.purge_expired(batch_size=10) == 25
    deletes = [q for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3
    assert list(TaskResult.objects.values_list("message_id", flat=True)) == [keep.message_id]


def test_the_setting_picks_the_backend(settings):
    from djqueue.results.database import DatabaseResultBackend
    from djqueue.results.redis import RedisResultBackend

    assert isinstance(backend_from_setting("db", ttl=1000), DatabaseResultBackend)
    redis_backend = backend_from_setting("redis://localhost:6379/3?namespace=app", ttl=1000)
    assert isinstance(redis_backend, RedisResultBackend)
    assert redis_backend.namespace == "app"
    assert redis_backend.client.connection_pool.connection_kwargs["db"] == 3
    settings.DJQUEUE = {**settings.DJQUEUE, "RESULT_BACKEND": "redis://localhost:6379/0", "RESULT_TTL": 5000}
    backend = get_result_backend()
    assert isinstance(backend, RedisResultBackend) and backend.ttl == 5000


@pytest.mark.parametrize("method", ["_get", "count_group_completed", "purge_expired"])
def test_the_interface_names_what_a_subclass_must_implement(method):
    backend = ResultBackend(ttl=1000)
    with pytest.raises(NotImplementedError, match=method):
        getattr(backend, method)() if method == "purge_expired" else getattr(backend, method)("x")
