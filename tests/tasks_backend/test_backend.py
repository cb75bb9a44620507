"""djqueue as a backend of Django's tasks framework (Django 6.0+)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

pytest.importorskip("django.tasks")

from django.db import connections
from django.tasks import TaskResultStatus, task_backends
from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone

from djqueue import Worker
from djqueue.backends import TASK_ACTOR_NAME, DjqueueTaskBackend, TaskDeadLettered, task_actor
from djqueue.brokers import broker_from_url, get_broker, set_broker
from djqueue.errors import ActorNotFound, ConnectionError, DecodeError
from djqueue.middleware import Middleware
from djqueue.models import DjangoTaskResult
from tests.process import start_workers, wait_for
from tests.tasks_backend import djtasks

pytestmark = pytest.mark.django_db(transaction=True)

BACKEND = "djqueue.backends.DjqueueTaskBackend"


@pytest.fixture
def tasks_setting(settings, stub_broker):
    settings.TASKS = {"default": {"BACKEND": BACKEND, "QUEUES": []}}
    djtasks.ran.clear()
    return settings


@pytest.fixture
def worker(tasks_setting, stub_broker):
    worker = Worker(stub_broker, worker_threads=1, worker_timeout=100)
    yield worker
    worker.stop(timeout=5_000)


def run_all(worker) -> None:
    if not worker.consumers:
        worker.start()
    worker.join(timeout=10_000)


@pytest.fixture
def finished_signals():
    """The statuses of the task_finished signals sent during the test, in order."""
    seen = []

    def receive(sender, task_result, **kwargs):
        seen.append((task_result.id, task_result.status))

    task_finished.connect(receive)
    yield seen
    task_finished.disconnect(receive)


def test_backend_abilities(tasks_setting):
    backend = task_backends["default"]
    assert isinstance(backend, DjqueueTaskBackend)
    assert backend.supports_defer and backend.supports_priority
    assert backend.supports_get_result and backend.supports_async_task


def test_enqueue_run_and_read_the_result(worker, stub_broker):
    result = djtasks.add.enqueue(2, 3)
    assert result.status == TaskResultStatus.READY and result.enqueued_at is not None
    assert djtasks.add.get_result(result.id).status == TaskResultStatus.READY
    assert stub_broker.get_queue_stats("default").ready == 1
    run_all(worker)
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    assert result.args == [2, 3] and result.attempts == 1 and result.errors == []
    assert result.started_at <= result.finished_at
    fresh = djtasks.add.get_result(result.id)
    assert fresh.return_value == 5 and fresh.task.func is djtasks.add.func
    assert djtasks.ran == [("add", 2, 3)]


def test_a_failure_keeps_its_traceback_and_is_not_retried(worker):
    result = djtasks.explode.enqueue("boom")
    run_all(worker)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors
    assert error.exception_class is ValueError
    assert "ValueError: boom" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = result.return_value


def test_options_turn_on_retries(worker, tasks_setting):
    tasks_setting.TASKS = {
        "default": {"BACKEND": BACKEND, "OPTIONS": {"max_retries": 2, "min_backoff": 1, "max_backoff": 5}}
    }
    result = djtasks.explode.enqueue("again")
    run_all(worker)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert len(result.errors) == 3 and result.attempts == 3


def test_unknown_options_are_refused(settings, stub_broker):
    settings.TASKS = {"default": {"BACKEND": BACKEND, "OPTIONS": {"max_retires": 2}}}
    with pytest.raises(InvalidTaskBackend, match="max_retires"):
        djtasks.add.enqueue(1, 2)


def test_signals_are_sent(worker):
    seen = []

    def receiver(signal_name):
        def receive(sender, task_result, **kwargs):
            seen.append((signal_name, sender, task_result.status))

        return receive

    receivers = {name: receiver(name) for name in ("enqueued", "started", "finished")}
    task_enqueued.connect(receivers["enqueued"])
    task_started.connect(receivers["started"])
    task_finished.connect(receivers["finished"])
    try:
        djtasks.add.enqueue(1, 1)
        run_all(worker)
    finally:
        task_enqueued.disconnect(receivers["enqueued"])
        task_started.disconnect(receivers["started"])
        task_finished.disconnect(receivers["finished"])
    assert seen == [
        ("enqueued", DjqueueTaskBackend, TaskResultStatus.READY),
        ("started", DjqueueTaskBackend, TaskResultStatus.RUNNING),
        ("finished", DjqueueTaskBackend, TaskResultStatus.SUCCESSFUL),
    ]


def test_higher_priority_runs_first(worker):
    djtasks.note.using(priority=-100).enqueue("low")
    djtasks.note.enqueue("normal")
    djtasks.note.using(priority=100).enqueue("high")
    run_all(worker)
    assert djtasks.ran == ["high", "normal", "low"]


def test_run_after_delays_the_message(worker, stub_broker):
    later = djtasks.note.using(run_after=timezone.now() + dt.timedelta(minutes=10)).enqueue("later")
    soon = djtasks.note.using(run_after=timezone.now() - dt.timedelta(seconds=1)).enqueue("soon")
    stats = stub_broker.get_queue_stats("default")
    assert (stats.ready, stats.delayed) == (1, 1)
    worker.start()
    wait_for(lambda: djtasks.note.get_result(soon.id).is_finished, timeout=10, message="the due task")
    assert djtasks.ran == ["soon"]
    assert djtasks.note.get_result(later.id).status == TaskResultStatus.READY
    assert djtasks.note.get_result(later.id).task.run_after is not None


def test_context_and_async_tasks(worker):
    with_context = djtasks.with_context.enqueue(7)
    doubled = djtasks.async_double.enqueue(21)
    run_all(worker)
    with_context.refresh()
    doubled.refresh()
    assert with_context.return_value == {"attempt": 1, "id": with_context.id, "x": 7}
    assert doubled.return_value == 42


def test_queues_and_results_errors(worker, tasks_setting):
    result = djtasks.add.using(queue_name="dj_other").enqueue(1, 2)
    assert result.task.queue_name == "dj_other"
    with pytest.raises(InvalidTask, match="invalid queue name"):
        djtasks.add.using(queue_name="bad queue!").enqueue(1, 2)
    with pytest.raises(TaskResultDoesNotExist):
        djtasks.add.get_result(str(uuid.uuid4()))
    tasks_setting.TASKS = {"default": {"BACKEND": BACKEND}}  # Django's default: only "default"
    with pytest.raises(InvalidTask):
        djtasks.add.using(queue_name="dj_other").enqueue(1, 2)


def test_a_return_value_that_is_not_json_fails_the_task(worker):
    result = djtasks.not_json.enqueue()
    run_all(worker)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class is TypeError


def test_results_expire(worker, settings):
    result = djtasks.add.enqueue(1, 1)
    run_all(worker)
    DjangoTaskResult.objects.filter(pk=result.id).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with pytest.raises(TaskResultDoesNotExist):
        djtasks.add.get_result(result.id)


@pytest.mark.slow
def test_a_worker_process_runs_the_task(tmp_path, settings):
    broker = broker_from_url("db://default")
    previous = get_broker()
    set_broker(broker)
    settings.TASKS = {"default": {"BACKEND": BACKEND, "QUEUES": []}}
    queue = f"dj_{uuid.uuid4().hex[:8]}"
    w = start_workers(
        tmp_path, "db://default", "--processes", "1", "--threads", "2", "--queues", queue,
        env={"DJANGO_SETTINGS_MODULE": "tests.tasks_backend.settings"},
    )  # fmt: skip
    try:
        [child] = w.wait_children(1)
        result = djtasks.whoami.using(queue_name=queue).enqueue()
        final = wait_for(
            lambda: (r := djtasks.whoami.get_result(result.id)).is_finished and r,
            timeout=30,
            message="the task to finish in the worker process",
        )
        assert final.status == TaskResultStatus.SUCCESSFUL, final.errors
        assert final.return_value == child
        assert final.worker_ids == [f"{final.worker_ids[0].rsplit(':', 1)[0]}:{child}"]
        assert w.stop() == 0
    finally:
        if w.process.poll() is None:
            w.process.kill()
            w.process.wait(10)
        set_broker(previous)
        broker.close()
        for connection in connections.all():
            connection.close()


# -- tasks whose message is dead-lettered without the task failing by itself -------------


def last_error_once_failed(worker, result):
    """Run the queue; ``result`` must have failed: its last error."""
    run_all(worker)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    return result.errors[-1]


def test_a_task_whose_worker_kept_dying_fails_with_the_reason(worker, stub_broker, finished_signals):
    result = djtasks.add.enqueue(1, 2)
    # Five times a worker takes the message and dies while the task runs (its row says
    # RUNNING); the message goes back to the queue each time.
    for _ in range(5):
        consumer = stub_broker.consume("default", timeout=1_000)
        assert next(consumer).message_id == result.id
        DjangoTaskResult.objects.filter(pk=result.id).update(status="RUNNING", started_at=timezone.now())
        consumer.close()
    run_all(worker)  # the sixth delivery is over max_deliveries (5): dead-lettered
    result.refresh()
    assert result.status == TaskResultStatus.FAILED and result.finished_at is not None
    [error] = result.errors
    assert error.exception_class is TaskDeadLettered
    assert "delivered 6 times without finishing" in error.traceback
    assert djtasks.ran == []
    assert finished_signals == [(result.id, TaskResultStatus.FAILED)]
    assert DjangoTaskResult.objects.get(pk=result.id).expires_at is not None


def test_a_task_message_that_does_not_decode_fails_its_task(worker, stub_broker):
    result = djtasks.add.enqueue(1, 2)
    consumer = stub_broker.consume("default", timeout=1_000)
    proxy = next(consumer)
    consumer.ack(proxy)
    consumer.close()
    # The same message, mangled on the way by something that wrote the queue directly.
    stub_broker.enqueue_raw("default", proxy.data + b" trailing junk")
    error = last_error_once_failed(worker, result)
    assert error.exception_class is DecodeError
    assert "djqueue dead-lettered the task's message" in error.traceback


def test_a_task_message_without_its_actor_fails_its_task(worker, stub_broker):
    result = djtasks.add.enqueue(1, 2)
    # A broker that has lost the generic actor but kept its middleware; a worker whose
    # settings have no djqueue TASKS backend has neither (see docs/django-tasks.md).
    del stub_broker.actors[TASK_ACTOR_NAME]
    error = last_error_once_failed(worker, result)
    assert error.exception_class is ActorNotFound
    assert "unknown actor 'djqueue.django_task'" in error.traceback


def test_a_task_that_cannot_be_imported_fails_even_without_a_row(worker, stub_broker):
    # Sent as an older release would, for a task since renamed; its row is gone (expired).
    message = task_actor(stub_broker).send("default", "tests.tasks_backend.djtasks.renamed_away", [1], {})
    run_all(worker)
    row = DjangoTaskResult.objects.get(pk=message.message_id)
    assert (row.status, row.task_path, row.args) == (
        "FAILED",
        "tests.tasks_backend.djtasks.renamed_away",
        [1],
    )
    [error] = row.errors
    assert error["exception_class_path"] == "builtins.ImportError"
    assert "renamed_away" in error["traceback"] and "gave up after 0 retries" in error["traceback"]
    with pytest.raises(TaskResultDoesNotExist, match="cannot be imported"):
        djtasks.add.get_result(message.message_id)


class RefuseRetries(Middleware):
    """A broker that cannot store a retry (it went down after the delivery)."""

    def before_enqueue(self, broker, message, delay):
        if message.options.get("retries"):
            raise ConnectionError("the broker cannot store the retry")


def test_a_failure_that_cannot_be_retried_is_recorded_once(
    worker, tasks_setting, stub_broker, finished_signals
):
    # A retry is due, but the broker refuses to store it: the message is dead-lettered
    # although the task expected another attempt.
    tasks_setting.TASKS = {"default": {"BACKEND": BACKEND, "OPTIONS": {"max_retries": 3, "min_backoff": 1}}}
    stub_broker.add_middleware(RefuseRetries())
    result = djtasks.explode.enqueue("once")
    run_all(worker)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    [error] = result.errors  # the task's own traceback, not a second entry for the same failure
    assert error.exception_class is ValueError and "ValueError: once" in error.traceback
    assert finished_signals == [(result.id, TaskResultStatus.FAILED)]


def test_the_middleware_is_added_once(tasks_setting, stub_broker):
    from djqueue.backends import DeadLetteredTasks

    djtasks.add.enqueue(1, 2)
    djtasks.add.enqueue(3, 4)
    task_actor(stub_broker)
    assert sum(isinstance(m, DeadLetteredTasks) for m in stub_broker.middleware) == 1
