"""Broker fixtures: every broker, each test with its own queue (and Redis namespace)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connections

from djqueue.brokers import broker_from_url
from djqueue.brokers.base import Broker
from tests.process import delete_rabbitmq_queues

REDIS_URL = os.environ.get("DJQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("DJQUEUE_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
# Per test session: its clean-up deletes only its own queues, not a concurrent session's.
QUEUE_PREFIX = f"ct{os.getpid()}_"


@dataclass
class BrokerCase:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    # Options that make a dead worker's messages come back quickly in process tests.
    fast_recovery: dict[str, Any] = field(default_factory=dict)
    brokers: list[Broker] = field(default_factory=list)

    @property
    def in_memory(self) -> bool:
        return self.url.startswith("stub://")

    def make(self, **extra: Any) -> Broker:
        broker = broker_from_url(self.url, **{**self.options, **extra})
        self.brokers.append(broker)
        return broker

    def process_options(self) -> dict[str, Any]:
        return {**self.options, **self.fast_recovery}


CASES = [
    pytest.param("stub", id="stub"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


def make_case(name: str) -> BrokerCase:
    if name == "stub":
        return BrokerCase(name, "stub://")
    if name == "sqlite":
        return BrokerCase(name, "db://default", fast_recovery={"lease": 1500})
    if name == "postgres":
        return BrokerCase(name, "db://postgres", fast_recovery={"lease": 1500})
    if name == "redis":
        namespace = f"djqt{uuid.uuid4().hex[:8]}"
        return BrokerCase(
            name, REDIS_URL, {"namespace": namespace}, fast_recovery={"heartbeat_timeout": 1500}
        )
    if name == "rabbitmq":
        return BrokerCase(name, RABBITMQ_URL)
    raise ValueError(name)


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Any:
    case = make_case(request.param)
    yield case
    for broker in case.brokers:
        broker.close()
    for connection in connections.all():
        connection.close()
    if case.name == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{case.options['namespace']}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def queue() -> str:
    return f"{QUEUE_PREFIX}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session", autouse=True)
def _delete_test_rabbitmq_queues() -> Any:
    yield
    delete_rabbitmq_queues(RABBITMQ_URL, QUEUE_PREFIX)
