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

A task whose message is dead-lettered while the task itself recorded no failure (it
never ran: ``max_age`` passed, a worker without the actor, bytes that did not decode; or
it never finished: ``max_deliveries``, the worker running it kept dying) is failed by the
``DeadLetteredTasks`` middleware, with the reason as its error.

``OPTIONS`` are djqueue message options for every task of the backend, for instance
``{"max_retries": 3, "min_backoff": 1000, "time_limit": 60_000}``. By default a task
that raises is not retried (Django's own backends never retry).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
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
from .errors import ActorNotFound, ConfigurationError, DjqueueError
from .message import current_millis
from .middleware.base import Middleware
from .middleware.current_message import get_current_message
from .middleware.heartbeats import worker_id

logger = logging.getLogger("djqueue.backends")

TASK_ACTOR_NAME = "djqueue.django_task"

# The failure that run_django_task last recorded in this worker thread, so that
# DeadLetteredTasks does not record it a second time when the message is dead-lettered.
_recorded = threading.local()


class TaskDeadLettered(DjqueueError):
    """The error recorded for a task whose message djqueue dead-lettered for a reason
    that is no exception (``max_age``, ``max_deliveries``); its traceback is the reason."""


def run_django_task(alias: str, task_path: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """The generic actor: run the task ``task_path`` and record its outcome."""
    _recorded.exception = None
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
            _recorded.exception = e
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
        if not any(isinstance(m, DeadLetteredTasks) for m in broker.middleware):
            broker.add_middleware(DeadLetteredTasks())
        actor = Actor(
            run_django_task,
            broker=broker,
            actor_name=TASK_ACTOR_NAME,
            queue_name="default",
            priority=0,
            options={"max_retries": 0},
        )
    return actor


class DeadLetteredTasks(Middleware):
    """Fails the DjangoTaskResult of a task whose message is dead-lettered, unless the
    task already failed for good: a row otherwise stays ready or running for ever.

    The reason becomes the task's last error: the exception, if one was raised that the
    task did not record itself (``ActorNotFound`` for a worker without the actor,
    ``DecodeError`` for bytes that did not decode), else ``TaskDeadLettered``. Runs
    before the broker's nack, as DeadLetters does, so that the row is final before the
    message leaves the queue. task_actor() adds it to every broker with the generic actor.
    """

    def before_nack(self, broker: Broker, message: Any) -> None:
        # A message that did not decode may still be a task's: its id is looked up.
        if message.decode_error is None and message.actor_name != TASK_ACTOR_NAME:
            return
        try:
            _fail_dead_lettered(message)
        except Exception:
            # Never in the way of the dead letter itself.
            logger.exception("could not mark the task result of %s failed", message.message_id)


def _fail_dead_lettered(message: Any) -> None:
    """Mark the task result of the dead-lettered ``message`` (a MessageProxy) FAILED."""
    from .models import DjangoTaskResult

    recorded, _recorded.exception = getattr(_recorded, "exception", None), None
    rows = DjangoTaskResult.objects
    with transaction.atomic(using=router.db_for_write(DjangoTaskResult)):
        row = rows.select_for_update().filter(pk=message.message_id).first()
        if row is None:
            # Failed before the enqueueing transaction committed: the row is written here,
            # and the enqueuer's insert is ignored.
            new = _row_from_message(message)
            if new is None:
                return  # not a task's message after all
            rows.bulk_create([new], ignore_conflicts=True)
            row = rows.select_for_update().get(pk=message.message_id)
        if row.status not in (row.Status.READY, row.Status.RUNNING):
            return  # the task recorded its own end
        if message.exception is None or message.exception is not recorded:
            row.errors.append(_dead_letter_error(message))
        _finish(row, row.Status.FAILED)
    try:
        task = import_string(row.task_path)
    except ImportError:
        return  # no Task to describe in the signal
    if isinstance(task, Task):
        task_finished.send(sender=_sender(row.backend), task_result=to_task_result(row, task))


def _dead_letter_error(message: Any) -> dict[str, str]:
    """The error to record for a dead-lettered task message: its exception and reason."""
    exception = message.exception or message.decode_error
    if exception is not None:
        kind: type[BaseException] = type(exception)
    elif message.reason and message.reason.startswith("unknown actor"):
        kind = ActorNotFound
    else:
        kind = TaskDeadLettered
    lines = [message.traceback.rstrip()] if message.traceback else []
    lines.append(f"djqueue dead-lettered the task's message: {message.reason or 'no reason given'}")
    return {"exception_class_path": f"{kind.__module__}.{kind.__qualname__}", "traceback": "\n".join(lines)}


def _row_from_message(message: Any) -> Any:
    """A READY row for a task message whose row is missing, or None if it is no task's."""
    try:
        alias, task_path, args, kwargs = message.args
        kwargs = dict(kwargs)
    except (TypeError, ValueError):
        return None
    return _new_row(message.message_id, alias, task_path, message.queue_name, message.priority, args, kwargs)


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
        row = _new_row(
            message_id or f"local-{current_millis()}",
            alias,
            task_path,
            task.queue_name,
            task.priority,
            args,
            kwargs,
        )
    row.status = row.Status.RUNNING
    row.started_at = row.started_at or now
    row.last_attempted_at = now
    row.worker_ids = [*row.worker_ids, worker_id()]
    row.save()
    return row


def _new_row(
    row_id: str,
    alias: str,
    task_path: str,
    queue_name: str,
    priority: int,
    args: list[Any],
    kwargs: dict[str, Any],
) -> Any:
    """A READY row, for a task whose row the enqueuer has not committed (or that expired)."""
    from .models import DjangoTaskResult

    return DjangoTaskResult(
        id=row_id,
        task_path=task_path,
        backend=alias,
        queue_name=queue_name,
        priority=priority,
        args=args,
        kwargs=kwargs,
        enqueued_at=timezone.now(),
    )


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
