"""django.tasks tasks for the backend tests (imported only on Django 6+)."""

from __future__ import annotations

import os

from django.tasks import task

ran: list[object] = []


@task
def add(a: int, b: int) -> int:
    ran.append(("add", a, b))
    return a + b


@task
def explode(message: str) -> None:
    raise ValueError(message)


@task(takes_context=True)
def with_context(context, x: int) -> dict:
    return {"attempt": context.attempt, "id": context.task_result.id, "x": x}


@task
async def async_double(x: int) -> int:
    return x * 2


@task
def note(tag: str) -> str:
    ran.append(tag)
    return tag


@task
def whoami() -> int:
    return os.getpid()


@task
def not_json() -> object:
    return object()
