"""A backend for Django's tasks framework (``django.tasks``, Django 6.0+).

::

    TASKS = {"default": {"BACKEND": "djqueue.backends.DjqueueTaskBackend"}}

Then ``@django.tasks.task`` functions run on djqueue workers. Each ``enqueue()`` sends
one message to the generic actor ``djqueue.django_task`` on the task's queue; the
message carries the task's import path and arguments, and the worker imports the task
by that path when it runs it, so a task may live in any module. Django priorities
(-100..100, higher first) are djqueue priorities as they are; ``run_after`` is the
message's eta.

The task's state (ready, running, failed, successful), every attempt's traceback and
its return value are kept in a ``DjangoTaskResult`` row keyed by the message id, which
is the result's ``id``; the row expires ``DJQUEUE["RESULT_TTL"]`` ms after the task
finished. The ``task_enqueued`` signal is sent where the task is enqueued,
``task_started`` and ``task_finished`` in the worker process that runs it.

``OPTIONS`` are djqueue message options for every task of the backend, for instance
``{"max_retries": 3, "min_backoff": 1000, "time_limit": 60_000}``. By default a task
that raises is not retried (Django's own backends never retry).
"""

from __future__ import annotations

import datetime as dt
import traceback
from typing import Any

from django.conf import settings
from django.db import router, transaction
from django.utils import timezone
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

try:
    from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
except ImportError as e:  # Django < 6.0
    raise ImportError("djqueue.backends needs Django 6.0 or later (django.tasks)") from e

from . import conf
from .actor import CORE_OPTIONS, Actor
from .brokers import get_broker
from .brokers.base import Broker, validate_queue_name
from .errors import ConfigurationError
from .message import current_millis
from .middleware.current_message import get_current_message
from .middleware.heartbeats import worker_id

TASK_ACTOR_NAME = "djqueue.django_task"


def run_django_task(alias: str, task_path: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """The generic actor: run the task ``task_path`` and record its outcome."""
    task = import_string(task_path)
    if not isinstance(task, Task):
        raise TypeError(f"{task_path} is not a django.tasks Task (decorate it with @task)")
    message = get_current_message()
    message_id = message.message_id if message is not None else ""
    sender = _sender(alias)
    row = _running_row(message_id, alias, task, task_path, args, kwargs)
    result = to_task_result(row, task)
    task_started.send(sender=sender, task_result=result)
    try:
        if task.takes_context:
            value = task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = task.call(*args, **kwargs)
        value = normalize_json(value)
    except BaseException as e:
        final = message is None or _is_last_attempt(message, e)
        if not _is_shutdown(e):
            row.errors.append(
                {
                    "exception_class_path": f"{type(e).__module__}.{type(e).__qualname__}",
                    "traceback": "".join(traceback.format_exception(e)),
                }
            )
        _finish(row, row.Status.FAILED if final else row.Status.READY)
        if final:
            task_finished.send(sender=sender, task_result=to_task_result(row, task))
        raise
    row.return_value = value
    _finish(row, row.Status.SUCCESSFUL)
    task_finished.send(sender=sender, task_result=to_task_result(row, task))


def task_actor(broker: Broker) -> Actor[..., None]:
    """The generic actor on ``broker``, declared on first use."""
    actor = broker.actors.get(TASK_ACTOR_NAME)
    if actor is None:
        actor = Actor(
            run_django_task,
            broker=broker,
            actor_name=TASK_ACTOR_NAME,
            queue_name="default",
            priority=0,
            options={"max_retries": 0},
        )
    return actor


class DjqueueTaskBackend(BaseTaskBackend):
    """Runs ``django.tasks`` tasks on djqueue workers; results in ``DjangoTaskResult``."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        broker = get_broker()
        unknown = set(self.options) - broker.actor_options - {"eta"}
        if unknown or set(self.options) & CORE_OPTIONS:
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS'] has option(s) djqueue does not know here: "
                f"{', '.join(sorted(unknown | (set(self.options) & CORE_OPTIONS)))}; "
                f"use djqueue message options such as max_retries, min_backoff, time_limit"
            )
        # Declared now so that a worker process started before any task was sent
        # consumes the backend's queues.
        task_actor(broker)
        for queue_name in self.queues:
            broker.declare_queue(queue_name)

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        try:
            validate_queue_name(task.queue_name)
        except ConfigurationError as e:
            raise InvalidTask(str(e)) from None

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        from .models import DjangoTaskResult

        self.validate_task(task)
        broker = get_broker()
        message = task_actor(broker).message_with_options(
            args=(self.alias, task.module_path, list(args), dict(kwargs)),
            queue_name=task.queue_name,
            priority=task.priority,
            **self.options,
        )
        now = timezone.now()
        run_after = task.run_after
        if run_after is not None and timezone.is_naive(run_after):
            run_after = timezone.make_aware(run_after)
        row = DjangoTaskResult(
            id=message.message_id,
            task_path=task.module_path,
            backend=self.alias,
            queue_name=task.queue_name,
            priority=task.priority,
            args=normalize_json(list(args)),
            kwargs=normalize_json(dict(kwargs)),
            run_after=run_after,
            enqueued_at=now,
        )
        delay = None
        if run_after is not None:
            delay = max(0, int(run_after.timestamp() * 1000) - current_millis())
        with transaction.atomic(using=router.db_for_write(DjangoTaskResult)):
            # The row first: a worker may pick the message up at once. A worker that is
            # faster than this transaction (a broker outside the database) writes the row
            # itself, and then this insert is ignored.
            DjangoTaskResult.objects.bulk_create([row], ignore_conflicts=True)
            broker.enqueue(message, delay=delay)
        result = to_task_result(row, task)
        task_enqueued.send(sender=type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> TaskResult:
        from .models import DjangoTaskResult

        row = DjangoTaskResult.objects.filter(pk=result_id).first()
        if row is None or (row.expires_at is not None and row.expires_at <= timezone.now()):
            raise TaskResultDoesNotExist(result_id)
        try:
            task = import_string(row.task_path)
        except ImportError as e:
            raise TaskResultDoesNotExist(f"{result_id}: its task {row.task_path} cannot be imported: {e}")
        return to_task_result(row, task)


def to_task_result(row: Any, task: Task) -> TaskResult:
    """The Django TaskResult that a DjangoTaskResult row describes."""
    from django.tasks.base import TaskError

    changes = {"priority": row.priority, "queue_name": row.queue_name, "run_after": row.run_after}
    if any(getattr(task, name) != value for name, value in changes.items()):
        task = task.using(**changes)
    result = TaskResult(
        task=task,
        id=row.id,
        status=TaskResultStatus(row.status),
        enqueued_at=row.enqueued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        last_attempted_at=row.last_attempted_at,
        args=row.args,
        kwargs=row.kwargs,
        backend=row.backend,
        errors=[TaskError(**error) for error in row.errors],
        worker_ids=list(row.worker_ids),
    )
    object.__setattr__(result, "_return_value", row.return_value)
    return result


def connect_task_backends() -> None:
    """Build every djqueue backend of ``settings.TASKS`` so that the generic actor and
    the backends' queues are declared in this process (a worker must know them before
    it starts consuming). Called by the app's ``ready()``."""
    for alias, params in getattr(settings, "TASKS", {}).items():
        backend = params.get("BACKEND", "")
        if isinstance(backend, str) and issubclass(import_string(backend), DjqueueTaskBackend):
            task_backends[alias]


def _sender(alias: str) -> type:
    try:
        return type(task_backends[alias])
    except InvalidTaskBackend:
        return DjqueueTaskBackend


def _running_row(
    message_id: str, alias: str, task: Task, task_path: str, args: list[Any], kwargs: dict[str, Any]
) -> Any:
    from .models import DjangoTaskResult

    now = timezone.now()
    row = DjangoTaskResult.objects.filter(pk=message_id).first() if message_id else None
    if row is None:
        # The enqueueing transaction has not committed yet, or the row expired.
        row = DjangoTaskResult(
            id=message_id or f"local-{current_millis()}",
            task_path=task_path,
            backend=alias,
            queue_name=task.queue_name,
            priority=task.priority,
            args=args,
            kwargs=kwargs,
            enqueued_at=now,
        )
    row.status = row.Status.RUNNING
    row.started_at = row.started_at or now
    row.last_attempted_at = now
    row.worker_ids = [*row.worker_ids, worker_id()]
    row.save()
    return row


def _finish(row: Any, status: str) -> None:
    now = timezone.now()
    row.status = status
    if status != row.Status.READY:
        row.finished_at = now
        row.expires_at = now + dt.timedelta(milliseconds=conf.get("RESULT_TTL"))
    row.save(update_fields=["status", "finished_at", "expires_at", "errors", "return_value"])


def _is_last_attempt(message: Any, exception: BaseException) -> bool:
    """Whether Retries will give this failure up (then the task has failed for good)."""
    if _is_shutdown(exception):
        return False  # put back without spending a retry
    broker = get_broker()
    actor = broker.actors.get(message.actor_name)
    max_retries = message.options.get("max_retries")
    if max_retries is None:
        max_retries = actor.options.get("max_retries", 0) if actor is not None else 0
    return message.retries >= max_retries


def _is_shutdown(exception: BaseException) -> bool:
    from .middleware.shutdown import Shutdown

    return isinstance(exception, Shutdown)
