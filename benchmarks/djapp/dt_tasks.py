"""django-tasks-db's tasks for the benchmarks, run by its ``db_worker`` command."""

from __future__ import annotations

from django.db import transaction
from django_tasks import task

from benchmarks import work


@task(queue_name=work.QUEUE)
def noop() -> None:
    work.noop()


@task(queue_name=work.QUEUE)
def sleepy() -> None:
    work.sleepy()


@task(queue_name=work.QUEUE)
def ping(sent_at: float) -> None:
    work.ping(sent_at)


TASKS = {"noop": noop, "sleepy": sleepy, "ping": ping}


def send(name: str, *args: object) -> None:
    TASKS[name].enqueue(*args)


def send_batch(name: str, count: int) -> None:
    # django-tasks has no batch enqueue; one transaction around the loop is the
    # closest a user can get (one commit instead of one per task).
    target = TASKS[name]
    with transaction.atomic():
        for _ in range(count):
            target.enqueue()


def flush() -> None:
    """Nothing to wait for: an enqueue has committed its row when it returns."""


def close() -> None:
    pass
