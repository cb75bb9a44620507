"""The Redis results backend against socket timeouts and a Redis that cannot be reached.

redis-py gives up on a read after ``socket_timeout`` seconds (5 by default since
redis-py 8.0), so a blocking wait longer than that must still return its result, and a
dead Redis must fail with a djqueue error, never a redis-py one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from djqueue.brokers.redis_runner import block_limit
from djqueue.composition import group
from djqueue.errors import ConnectionError
from djqueue.message import Message
from djqueue.results import get_result_backend, set_result_backend
from djqueue.results.redis import RedisResultBackend

from .conftest import REDIS_URL, delete_namespace, random_name


def message() -> Message:
    return Message(queue_name="default", actor_name="add", args=(1, 2), kwargs={}, options={})


def with_query(url: str, **params: Any) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return parts._replace(query=query).geturl()


@pytest.fixture
def short_timeout_backend() -> Iterator[RedisResultBackend]:
    """A Redis results backend whose socket times out after 1 s, made the current one."""
    backend = RedisResultBackend(
        with_query(REDIS_URL, socket_timeout=1), ttl=60_000, namespace=random_name("djqr")
    )
    previous = get_result_backend()
    set_result_backend(backend)
    yield backend
    set_result_backend(previous)
    delete_namespace(backend.namespace)
    backend.close()


def store_later(backend: RedisResultBackend, seconds: float, *messages: Message) -> threading.Timer:
    timer = threading.Timer(seconds, lambda: [backend.store_result(m, m.message_id) for m in messages])
    timer.start()
    return timer


@pytest.mark.redis
def test_a_result_arriving_after_the_socket_timeout_is_returned(short_timeout_backend):
    backend = short_timeout_backend
    assert backend.client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
    m = message()
    timer = store_later(backend, 2.0, m)
    start = time.monotonic()
    assert backend.get_result(m, block=True, timeout=10_000) == m.message_id
    elapsed = time.monotonic() - start
    timer.join()
    assert 1.9 < elapsed < 3.0


@pytest.mark.redis
def test_a_group_waits_past_the_socket_timeout(short_timeout_backend):
    members = [message(), message()]
    timer = store_later(short_timeout_backend, 2.0, *members)
    results = group(members).get_results(block=True, timeout=10_000)
    timer.join()
    assert results == [m.message_id for m in members]


def test_the_socket_timeouts_default_to_5_s_and_the_url_overrides_them():
    backend = RedisResultBackend("redis://127.0.0.1:6379/0", ttl=1000)
    kwargs = backend.client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (5.0, 5.0)
    assert backend.max_block == 4.0
    backend = RedisResultBackend(
        "redis://127.0.0.1:6379/0?socket_timeout=30&socket_connect_timeout=2&namespace=app", ttl=1000
    )
    kwargs = backend.client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (30.0, 2.0)
    assert backend.namespace == "app" and backend.max_block == 29.0


@pytest.mark.parametrize(("socket_timeout", "limit"), [(5, 4), (30, 29), (1, 0.5), (0.2, 0.1), (None, None)])
def test_each_blocking_wait_ends_well_within_the_socket_timeout(socket_timeout, limit):
    import redis

    client = redis.Redis(socket_timeout=socket_timeout)
    assert block_limit(client) == limit


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_redis_raises_djqueue_connection_error(unused_port):
    backend = RedisResultBackend(f"redis://:secret@127.0.0.1:{unused_port}/0", ttl=1000)
    m = message()
    with pytest.raises(ConnectionError, match="cannot reach the Redis results backend") as excinfo:
        backend.get_result(m)
    assert "secret" not in str(excinfo.value)
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        backend.get_result(m, block=True, timeout=10_000)
    assert time.monotonic() - start < 2
    with pytest.raises(ConnectionError):
        backend.store_result(m, 1)
    with pytest.raises(ConnectionError):
        backend.count_group_completed("g")
    calls: list[int] = []
    with pytest.raises(ConnectionError):
        backend.run_once("k", 1000, lambda: calls.append(1))
    assert calls == []
    backend.close()


def test_a_redis_that_never_answers_fails_within_the_socket_timeout():
    # A listening socket that never accepts: connecting succeeds (the kernel completes
    # the handshake), then no reply ever comes, as from a hung server.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        backend = RedisResultBackend(f"redis://127.0.0.1:{port}/0?socket_timeout=0.5", ttl=1000)
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="cannot reach the Redis results backend"):
            backend.get_result(message(), block=True, timeout=10_000)
        assert time.monotonic() - start < 3
        backend.close()
