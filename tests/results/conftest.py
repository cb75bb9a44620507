"""Fixtures for results and composition tests: a broker and a results backend of each
kind, and an in-process worker on them. Redis keys live under a random namespace and
queues have random names, so concurrent runs on the same servers do not meet."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from djqueue import Worker
from djqueue.brokers import broker_from_url, get_broker, set_broker
from djqueue.results import get_result_backend, set_result_backend

REDIS_URL = os.environ.get("DJQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

BROKERS = [
    pytest.param("stub", id="stub"),
    pytest.param("db", id="db"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]
BACKENDS = [
    pytest.param("db", id="db-results"),
    pytest.param("redis", id="redis-results", marks=pytest.mark.redis),
]


def random_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def delete_namespace(namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def make_backend(kind: str, ttl: int = 60_000) -> Any:
    if kind == "db":
        from djqueue.results.database import DatabaseResultBackend

        return DatabaseResultBackend(ttl=ttl)
    from djqueue.results.redis import RedisResultBackend

    return RedisResultBackend(REDIS_URL, ttl=ttl, namespace=random_name("djqr"))


@pytest.fixture(params=BACKENDS)
def result_backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each results backend in turn, made the current one."""
    previous = get_result_backend()
    backend = make_backend(request.param)
    set_result_backend(backend)
    yield backend
    set_result_backend(previous)
    if request.param == "redis":
        delete_namespace(backend.namespace)
        backend.close()


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each broker in turn, with the default middleware, made the current broker."""
    namespace = random_name("djqb")
    if request.param == "stub":
        instance = broker_from_url("stub://")
    elif request.param == "db":
        instance = broker_from_url("db://default")
    else:
        instance = broker_from_url(REDIS_URL, namespace=namespace)
    previous = get_broker()
    set_broker(instance)
    yield instance
    set_broker(previous)
    instance.close()
    if request.param == "redis":
        delete_namespace(namespace)


@pytest.fixture
def queue_name() -> str:
    return random_name("q_")


@pytest.fixture
def worker(broker: Any) -> Iterator[Worker]:
    """An unstarted in-process worker on ``broker``: declare actors, then start() it."""
    instance = Worker(broker, worker_threads=2, worker_timeout=100)
    yield instance
    if instance.consumers:
        instance.stop(timeout=5_000)
    for connection in connections.all():
        connection.close()
