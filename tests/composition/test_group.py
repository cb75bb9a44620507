"""group([...]): results, waiting, and completion callbacks that fire exactly once."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connections

from djqueue import ResultFailure, ResultTimeout, actor
from djqueue.composition import group, pipeline
from djqueue.deadletters import retry_dead_letter
from djqueue.message import Message
from djqueue.middleware.callbacks import complete_group_member
from djqueue.models import DeadLetter

pytestmark = pytest.mark.django_db(transaction=True)


def declare(broker, queue_name):
    completions: list[tuple] = []

    @actor(broker=broker, queue_name=queue_name, actor_name="square")
    def square(n: int) -> int:
        time.sleep(0.01 * (n % 3))  # members finish out of order
        return n * n

    @actor(broker=broker, queue_name=queue_name, actor_name="inc")
    def inc(n: int) -> int:
        return n + 1

    @actor(broker=broker, queue_name=queue_name, actor_name="fail", max_retries=0)
    def fail() -> None:
        raise LookupError("member failed")

    @actor(broker=broker, queue_name=queue_name, actor_name="completed", store_results=True)
    def completed(label: str) -> str:
        completions.append((label,))
        return f"{label} done"

    return square, inc, fail, completed, completions


def test_results_in_order_and_one_completion_callback(broker, result_backend, worker, queue_name):
    square, inc, _, completed, completions = declare(broker, queue_name)
    worker.start()
    g = group([*(square.message(n) for n in range(8)), square.message(3) | inc.message() | inc.message()])
    callback = completed.message("all")
    g.add_completion_callback(callback)
    g.run()
    assert g.get_results(block=True, timeout=10_000) == [0, 1, 4, 9, 16, 25, 36, 49, 11]
    assert callback.get_result(block=True, timeout=10_000) == "all done"
    worker.join(timeout=10_000)
    assert completions == [("all",)]


def test_wait_and_non_blocking_results(broker, result_backend, worker, queue_name):
    square, *_ = declare(broker, queue_name)
    g = group([square.message(2), square.message(3)]).run()
    with pytest.raises(ResultTimeout):
        g.wait(timeout=200)  # no worker yet
    worker.start()
    g.wait(timeout=10_000)
    assert g.get_results() == [4, 9]


def test_a_delayed_group_runs_its_members_after_the_delay(broker, result_backend, worker, queue_name):
    square, *_ = declare(broker, queue_name)
    worker.start()
    started = time.monotonic()
    g = group([square.message(2), square.message(3)]).run(delay=500)
    assert g.get_results(block=True, timeout=10_000) == [4, 9]
    assert time.monotonic() - started >= 0.5


def test_a_failed_member_fails_the_results_and_the_callback_never_fires(
    broker, result_backend, worker, queue_name
):
    square, _, fail, completed, completions = declare(broker, queue_name)
    worker.start()
    g = group(
        [square.message(2), fail.message(), square.message(1) | fail.message_with_options(pipe_ignore=True)]
    )
    g.add_completion_callback(completed.message("never"))
    g.run()
    with pytest.raises(ResultFailure) as excinfo:
        g.get_results(block=True, timeout=10_000)
    assert excinfo.value.exception_type == "LookupError"
    worker.join(timeout=10_000)
    assert completions == []


def test_an_empty_group_completes_at_once(stub_broker):
    @actor(broker=stub_broker, actor_name="noop")
    def noop() -> None: ...

    g = group([])
    g.add_completion_callback(noop.message())
    g.run()
    assert stub_broker.get_queue_stats("default").ready == 1
    assert g.get_results(block=True, timeout=100) == []


def test_completion_is_counted_once_per_member_under_races_and_redelivery(stub_broker, result_backend):
    def enqueued() -> int:
        return stub_broker.get_queue_stats("callbacks").ready

    callback = Message(queue_name="callbacks", actor_name="completed", args=("x",), kwargs={}, options={})
    options = {
        "group_id": "8c3c9d3b-2f7f-4d5e-9a36-1f0f7a6e2b11",
        "group_size": 6,
        "group_callbacks": [callback.asdict()],
    }
    members = [
        Message(queue_name="default", actor_name="m", args=(), kwargs={}, options=options) for _ in range(6)
    ]

    for member in members[:5]:
        result_backend.store_result(member, 1)
        complete_group_member(stub_broker, member)
    # The fifth member delivered again does not complete a group that lacks the sixth.
    result_backend.store_result(members[4], 1)
    complete_group_member(stub_broker, members[4])
    assert enqueued() == 0

    result_backend.store_result(members[5], 1)
    barrier = threading.Barrier(6)

    def finish(member: Message) -> None:
        # Six workers (the last member and five redelivered ones) see a full count at once.
        barrier.wait()
        try:
            complete_group_member(stub_broker, member)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=finish, args=(m,)) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert enqueued() == 1


def test_children_must_be_messages_or_pipelines(stub_broker):
    with pytest.raises(TypeError):
        group([group([])])
    p = pipeline([Message(queue_name="default", actor_name="a", args=(), kwargs={}, options={})])
    assert group([p]).message_ids == p.message_ids


def test_a_member_retried_from_its_dead_letter_completes_the_group(
    broker, result_backend, worker, queue_name
):
    square, _, _, completed, completions = declare(broker, queue_name)
    state = {"fixed": False}

    @actor(broker=broker, queue_name=queue_name, actor_name="fragile", max_retries=0)
    def fragile(n: int) -> int:
        if not state["fixed"]:
            raise ConnectionError("down")
        return -n

    worker.start()
    g = group([square.message(2), fragile.message(5)])
    g.add_completion_callback(completed.message("late"))
    g.run()
    with pytest.raises(ResultFailure):
        g.get_results(block=True, timeout=10_000)
    worker.join(timeout=10_000)
    assert completions == []

    state["fixed"] = True
    new_id = retry_dead_letter(DeadLetter.objects.get(actor_name="fragile"), broker=broker)
    assert result_backend.get_result(new_id, block=True, timeout=10_000) == -5
    worker.join(timeout=10_000)
    assert completions == [("late",)]
