"""store_results, result_ttl and on_success / on_failure, through a worker on each
broker and each results backend."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from djqueue import ResultFailure, ResultMissing, actor

pytestmark = pytest.mark.django_db(transaction=True)


def test_results_are_stored_on_success_and_on_final_failure(broker, result_backend, worker, queue_name):
    @actor(broker=broker, queue_name=queue_name, store_results=True)
    def add(a: int, b: int) -> dict[str, int]:
        return {"sum": a + b}

    @actor(
        broker=broker,
        queue_name=queue_name,
        store_results=True,
        max_retries=1,
        min_backoff=10,
        max_backoff=20,
    )
    def explode(text: str) -> None:
        raise ValueError(f"exploded: {text}")

    @actor(broker=broker, queue_name=queue_name)
    def unstored() -> int:
        return 1

    worker.start()
    ok, bad, plain = add.send(2, 3), explode.send("boom"), unstored.send()
    assert ok.get_result(block=True, timeout=10_000) == {"sum": 5}
    with pytest.raises(ResultFailure) as excinfo:
        bad.get_result(block=True, timeout=10_000)
    assert excinfo.value.exception_type == "ValueError"
    assert excinfo.value.exception_message == "exploded: boom"
    worker.join(timeout=10_000)
    with pytest.raises(ResultMissing):
        plain.get_result()


def test_a_retried_message_stores_only_its_final_outcome(broker, result_backend, worker, queue_name):
    attempts: list[int] = []

    @actor(
        broker=broker,
        queue_name=queue_name,
        store_results=True,
        max_retries=3,
        min_backoff=10,
        max_backoff=20,
    )
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return "third time lucky"

    worker.start()
    message = flaky.send()
    assert message.get_result(block=True, timeout=10_000) == "third time lucky"
    assert len(attempts) == 3


def test_a_result_json_cannot_hold_is_a_failure_not_a_hang(stub_broker, stub_worker):
    @actor(broker=stub_broker, store_results=True)
    def make_set() -> set[int]:
        return {1, 2}

    stub_worker.start()
    with pytest.raises(ResultFailure, match="not JSON serializable"):
        make_set.send().get_result(block=True, timeout=5000)


def test_result_ttl_is_per_actor(stub_broker, stub_worker):
    from djqueue.models import TaskResult

    @actor(broker=stub_broker, store_results=True, result_ttl=60_000)
    def short() -> int:
        return 1

    stub_worker.start()
    message = short.send()
    message.get_result(block=True, timeout=5000)
    row = TaskResult.objects.get(message_id=message.message_id)
    assert 59 < (row.expires_at - row.finished_at).total_seconds() <= 60


def test_on_success_and_on_failure_get_the_message_and_outcome(broker, worker, queue_name):
    seen: dict[str, Any] = {}
    done = threading.Event()

    @actor(broker=broker, queue_name=queue_name, actor_name="succeeded")
    def succeeded(message_data: dict[str, Any], result: Any) -> None:
        seen["success"] = (message_data, result)
        if "failure" in seen:
            done.set()

    @actor(broker=broker, queue_name=queue_name, actor_name="failed")
    def failed(message_data: dict[str, Any], exception_data: dict[str, str]) -> None:
        seen["failure"] = (message_data, exception_data)
        if "success" in seen:
            done.set()

    @actor(broker=broker, queue_name=queue_name, on_success="succeeded", on_failure=failed)
    def job(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n * 2

    attempts: list[int] = []

    @actor(
        broker=broker,
        queue_name=queue_name,
        on_failure="failed",
        max_retries=2,
        min_backoff=10,
        max_backoff=20,
    )
    def retried() -> None:
        attempts.append(1)
        raise RuntimeError("always")

    worker.start()
    good = job.send(21)
    job.send_with_options(args=(-1,), max_retries=0)
    assert done.wait(10)
    assert seen["success"][0]["message_id"] == good.message_id
    assert seen["success"][1] == 42
    assert seen["failure"][0]["args"] == [-1]
    assert seen["failure"][1] == {"type": "ValueError", "message": "negative"}

    # on_failure fires once, when the message fails for good, not on each retry.
    seen.clear()
    done.clear()
    seen["success"] = None
    retried.send()
    assert done.wait(10)
    worker.join(timeout=10_000)
    assert len(attempts) == 3
    assert seen["failure"][1]["type"] == "RuntimeError"
