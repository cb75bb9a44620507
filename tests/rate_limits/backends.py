"""A fixture factory for every rate-limit backend, shared by tests/rate_limits and
tests/production: memory, the database (SQLite and PostgreSQL) and Redis, each test with
its own Redis namespace."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from djqueue.rate_limits.base import RateLimitBackend

REDIS_URL = os.environ.get("DJQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


def make_backend(name: str) -> RateLimitBackend:
    if name == "memory":
        from djqueue.rate_limits.backends.memory import MemoryBackend

        return MemoryBackend()
    if name in ("sqlite", "postgres"):
        from djqueue.rate_limits.backends.database import DatabaseBackend

        return DatabaseBackend(using="default" if name == "sqlite" else "postgres")
    if name == "redis":
        from djqueue.rate_limits.backends.redis import RedisBackend

        return RedisBackend.from_url(REDIS_URL, namespace=f"djqrl{uuid.uuid4().hex[:8]}:")
    raise ValueError(name)


def cleanup(backend: RateLimitBackend) -> None:
    from django.db import connections

    if backend.name == "redis":
        client = backend.client  # type: ignore[attr-defined]
        keys = list(client.scan_iter(match=backend.namespace + "*", count=1000))  # type: ignore[attr-defined]
        if keys:
            client.delete(*keys)
    backend.close()
    for connection in connections.all():
        connection.close()


def backend_fixture(request: pytest.FixtureRequest) -> Iterator[RateLimitBackend]:
    backend = make_backend(request.param)
    yield backend
    cleanup(backend)
