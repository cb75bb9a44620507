"""Results in Redis (``RESULT_BACKEND = "redis://host:6379/0"``).

Keys, under a namespace (default ``djqueue``; ``?namespace=NAME`` in the URL):

- ``NS:result:ID``         the result as JSON, expiring after the TTL
- ``NS:result-notify:ID``  a one-element list pushed with the result; waiters block on it
- ``NS:group:GROUP``       the set of a group's members that succeeded
- ``NS:once:KEY``          claims taken by ``run_once``

A waiter blocks in BLMOVE on the notify list, moving the element onto the same list
so that it stays for every other waiter; nothing polls.

Other query parameters of the URL go to redis-py (``socket_timeout``,
``socket_connect_timeout``, ... in seconds). A BLMOVE must answer within the socket
timeout, so a long wait is made of several, each shorter than it. Errors from Redis
reach callers as djqueue errors: ``djqueue.errors.ConnectionError`` when Redis cannot
be reached or does not answer in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..brokers import mask_url
from ..brokers.redis_runner import block_limit
from ..errors import ConnectionError, DjqueueError
from .base import SUCCEEDED, ResultBackend, StoredResult

try:
    import redis
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the Redis results backend needs the redis package ({e}): pip install 'djqueue[redis]'"
    ) from e

DEFAULT_NAMESPACE = "djqueue"
# Seconds. Set explicitly because redis-py changed them (None before 8.0, 5 since): a
# dead Redis must fail every call, including a wait, within a few seconds whatever
# the installed version.
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_SOCKET_CONNECT_TIMEOUT = 5.0


def split_namespace(url: str) -> tuple[str, str | None]:
    """(``url`` without its ``namespace`` query parameter, that namespace or None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    namespace = next((value for key, value in query if key == "namespace"), None)
    rest = [(key, value) for key, value in query if key != "namespace"]
    return urlunsplit(parts._replace(query=urlencode(rest))), namespace


class RedisResultBackend(ResultBackend):
    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        ttl: int,
        namespace: str | None = None,
        client: Any = None,
    ) -> None:
        super().__init__(ttl=ttl)
        url, url_namespace = split_namespace(url)
        self.url = url
        self.namespace = namespace or url_namespace or DEFAULT_NAMESPACE
        if client is None:
            # Parameters in the URL override these defaults.
            client = redis.Redis.from_url(
                url,
                socket_timeout=DEFAULT_SOCKET_TIMEOUT,
                socket_connect_timeout=DEFAULT_SOCKET_CONNECT_TIMEOUT,
            )
        self.client = client
        self.max_block = block_limit(client)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        # Callers catch djqueue errors only; a redis-py exception would escape them.
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as e:
            raise ConnectionError(
                f"cannot reach the Redis results backend at {mask_url(self.url)}: {e}; check "
                "DJQUEUE['RESULT_BACKEND'] and that Redis is running"
            ) from e
        except redis.RedisError as e:
            raise DjqueueError(f"Redis results backend error at {mask_url(self.url)}: {e}") from e

    def _key(self, kind: str, name: str) -> str:
        return f"{self.namespace}:{kind}:{name}"

    def _get(self, message_id: str) -> StoredResult | None:
        with self._errors():
            data = self.client.get(self._key("result", message_id))
        return None if data is None else StoredResult.from_json(data)

    def _store(self, message: Any, stored: StoredResult, ttl: int) -> None:
        message_id = message.message_id
        notify = self._key("result-notify", message_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key("result", message_id), stored.to_json(), px=ttl)
        # Exactly one element, however often the result is stored: waiters only need
        # to know that there is something to read.
        pipe.delete(notify)
        pipe.rpush(notify, 1)
        pipe.pexpire(notify, ttl)
        group_id = message.options.get("group_id")
        if group_id and stored.status == SUCCEEDED:
            group = self._key("group", group_id)
            pipe.sadd(group, message_id)
            pipe.pexpire(group, ttl)
        with self._errors():
            pipe.execute()

    def _wait(self, message_id: str, timeout: int) -> StoredResult | None:
        notify = self._key("result-notify", message_id)
        deadline = time.monotonic() + timeout / 1000
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._get(message_id)
            block = remaining if self.max_block is None else min(remaining, self.max_block)
            # The element is moved onto the same list, so it stays there for other waiters.
            # Redis takes the timeout in seconds; 0 would mean forever.
            with self._errors():
                moved = self.client.blmove(notify, notify, max(block, 0.01), "LEFT", "RIGHT")
            if moved is not None:
                stored = self._get(message_id)
                if stored is not None:
                    return stored

    def count_group_completed(self, group_id: str) -> int:
        with self._errors():
            return int(self.client.scard(self._key("group", group_id)))

    def run_once(self, key: str, ttl: int, fn: Callable[[], Any]) -> bool:
        claim = self._key("once", key)
        with self._errors():
            if not self.client.set(claim, 1, nx=True, px=ttl):
                return False
        try:
            fn()
        except BaseException:
            with self._errors():
                self.client.delete(claim)
            raise
        return True

    def purge_expired(self, *, batch_size: int = 1000) -> int:
        # Redis expires every key on its own.
        return 0

    def close(self) -> None:
        with self._errors():
            self.client.close()
