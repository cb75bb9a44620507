from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from django.db import connections

from djqueue.rate_limits import set_backend
from djqueue.rate_limits.backends.memory import MemoryBackend
from djqueue.rate_limits.base import RateLimitBackend
from tests.brokers.conftest import CASES, BrokerCase, make_case
from tests.process import delete_rabbitmq_queues
from tests.rate_limits.backends import BACKENDS, cleanup, make_backend


@pytest.fixture
def memory_backend() -> Iterator[MemoryBackend]:
    """A fresh memory store made the process-wide rate-limit backend."""
    backend = MemoryBackend()
    set_backend(backend)
    yield backend
    set_backend(None)


@pytest.fixture(params=BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> Iterator[RateLimitBackend]:
    """Each backend in turn, made the process-wide rate-limit backend."""
    backend = make_backend(request.param)
    set_backend(backend)
    yield backend
    cleanup(backend)
    set_backend(None)


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    """Each broker in turn (see tests/brokers/conftest.py), with its cleanup."""
    case = make_case(request.param)
    yield case
    for broker in case.brokers:
        broker.close()
    for connection in connections.all():
        connection.close()
    if case.name == "redis":
        import redis

        client = redis.Redis.from_url(case.url)
        keys = list(client.scan_iter(match=f"{case.options['namespace']}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def queue(case: BrokerCase) -> Iterator[str]:
    name = f"pq_{uuid.uuid4().hex[:10]}"
    yield name
    if case.name == "rabbitmq":
        delete_rabbitmq_queues(case.url, name)
