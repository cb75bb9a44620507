"""Which store DJQUEUE["RATE_LIMIT_BACKEND"] selects, and the process-wide backend."""

from __future__ import annotations

import pytest
from django.test import override_settings

from djqueue.errors import ConfigurationError
from djqueue.rate_limits import ConcurrentRateLimiter, get_backend, set_backend
from djqueue.rate_limits.backends import backend_from_setting
from djqueue.rate_limits.backends.database import DatabaseBackend
from djqueue.rate_limits.backends.memory import MemoryBackend
from djqueue.rate_limits.backends.redis import RedisBackend


@pytest.mark.parametrize(
    ("value", "broker_url", "kind", "detail"),
    [
        (None, "db://default", DatabaseBackend, "default"),
        (None, "db://postgres", DatabaseBackend, "postgres"),
        (None, "stub://", DatabaseBackend, "default"),
        (None, "amqp://guest:guest@localhost:5672/%2F", DatabaseBackend, "default"),
        ("db", "db://postgres", DatabaseBackend, "postgres"),
        ("db", "redis://localhost:6379/0", DatabaseBackend, "default"),
        (None, "redis://:secret@localhost:6379/3", RedisBackend, "redis://:***@localhost:6379/3"),
        ("redis://localhost:6379/1", "db://default", RedisBackend, "redis://localhost:6379/1"),
        ("memory", "redis://localhost:6379/0", MemoryBackend, "MemoryBackend()"),
    ],
)
def test_backend_from_setting(value, broker_url, kind, detail):
    backend = backend_from_setting(value, broker_url)
    assert type(backend) is kind
    assert detail in repr(backend), "and never a password"
    assert "secret" not in repr(backend)
    backend.close()


def test_the_broker_namespace_is_reused_for_the_brokers_redis():
    backend = backend_from_setting(None, "redis://localhost:6379/0", {"namespace": "shop"})
    assert backend.namespace == "shop:"
    other = backend_from_setting(
        "redis://localhost:6379/1", "redis://localhost:6379/0", {"namespace": "shop"}
    )
    assert other.namespace == "djqueue:"


def test_an_unknown_value_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="RATE_LIMIT_BACKEND"):
        backend_from_setting("memcached://x", "db://default")


def test_get_backend_follows_the_setting():
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", "RATE_LIMIT_BACKEND": "memory"}):
        backend = get_backend()
        assert isinstance(backend, MemoryBackend)
        assert get_backend() is backend, "built once per process"
        assert ConcurrentRateLimiter("k", 1).backend is backend
    with override_settings(DJQUEUE={"BROKER_URL": "db://postgres"}):
        backend = get_backend()
        assert isinstance(backend, DatabaseBackend) and backend.using == "postgres"
    mine = MemoryBackend()
    try:
        assert set_backend(mine) is mine and get_backend() is mine
    finally:
        set_backend(None)
