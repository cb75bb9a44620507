"""pipeline([...]) and ``|``, through a worker on each broker and results backend."""

from __future__ import annotations

import pytest

from djqueue import ResultFailure, actor
from djqueue.composition import pipeline

pytestmark = pytest.mark.django_db(transaction=True)


def declare(broker, queue_name):
    calls: list[tuple] = []

    @actor(broker=broker, queue_name=queue_name, actor_name="add")
    def add(a: int, b: int) -> int:
        calls.append(("add", a, b))
        return a + b

    @actor(broker=broker, queue_name=queue_name, actor_name="double")
    def double(n: int) -> int:
        calls.append(("double", n))
        return n * 2

    @actor(broker=broker, queue_name=queue_name, actor_name="hello")
    def hello() -> str:
        calls.append(("hello",))
        return "hello"

    @actor(broker=broker, queue_name=queue_name, actor_name="fail", max_retries=0)
    def fail(n: int) -> None:
        calls.append(("fail", n))
        raise ZeroDivisionError(f"cannot divide {n}")

    return add, double, hello, fail, calls


def test_each_result_is_the_next_messages_last_argument(broker, result_backend, worker, queue_name):
    add, double, _, _, calls = declare(broker, queue_name)
    worker.start()
    # None of these actors sets store_results: the pipeline stores its last result itself.
    p = pipeline([add.message(1, 2), add.message(10), double.message()]).run()
    assert p.get_result(block=True, timeout=10_000) == 26
    assert calls == [("add", 1, 2), ("add", 10, 3), ("double", 13)]


def test_pipe_ignore_and_the_or_operator(broker, result_backend, worker, queue_name):
    add, double, hello, _, _ = declare(broker, queue_name)
    worker.start()
    p = (
        double.message(4)
        | hello.message_with_options(pipe_ignore=True)
        | add.message_with_options(args=(1, 2))
    )
    assert isinstance(p, pipeline) and len(p) == 3
    # add(1, 2) gets "hello" appended unless it, too, ignores the pipe: it fails for good,
    # and the pipeline's result says why.
    p.run()
    with pytest.raises(ResultFailure) as excinfo:
        p.get_result(block=True, timeout=10_000)
    assert excinfo.value.exception_type == "ArgumentsMismatch"

    q = double.message(4) | hello.message_with_options(pipe_ignore=True)
    assert q.run().get_result(block=True, timeout=10_000) == "hello"


def test_the_chain_stops_at_a_failure_and_the_result_fails_at_once(
    broker, result_backend, worker, queue_name
):
    add, double, _, fail, calls = declare(broker, queue_name)
    worker.start()
    p = pipeline([add.message(1, 1), fail.message(), double.message()]).run()
    # Fails fast with the cause, rather than waiting for the whole timeout.
    with pytest.raises(ResultFailure) as excinfo:
        p.get_result(block=True, timeout=10_000)
    assert excinfo.value.exception_type == "ZeroDivisionError"
    assert excinfo.value.exception_message == "cannot divide 2"
    worker.join(timeout=10_000)
    assert ("double", 2) not in calls and [c[0] for c in calls] == ["add", "fail"]


def test_pipelines_nest_and_keep_message_ids(stub_broker):
    @actor(broker=stub_broker, actor_name="step")
    def step(*args: int) -> int:
        return sum(args)

    first, second, third = step.message(1), step.message(2), step.message(3)
    p = pipeline([first | second, third])
    assert p.message_ids == [first.message_id, second.message_id, third.message_id]
    built = p.build()
    assert built.message_id == first.message_id
    assert built.options["pipe_target"]["message_id"] == second.message_id
    assert built.options["pipe_target"]["options"]["pipe_target"]["options"]["store_results"] is True
    with pytest.raises(TypeError):
        pipeline([first, "not a message"])
