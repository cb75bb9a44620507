"""A Redis backend: one Lua script per operation, so every step is atomic on the server.

The scripts read the time from Redis itself (``TIME``), so workers on hosts whose clocks
disagree still share one notion of "now". Keys: ``<namespace>concurrent:<key>`` (a sorted
set of slot tokens scored by expiry), ``<namespace>bucket:<key>`` (a hash),
``<namespace>window:<key>`` (a sorted set of admissions scored by time),
``<namespace>unique:<key>`` (a string holding the owner's message id, SET with PX) and
``<namespace>unique-owner:<message id>`` (the reverse link, so a cancel can free it).
Every key expires by itself once it no longer matters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

try:
    import redis
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Redis rate-limit backend needs the redis package: pip install 'djqueue[redis]'"
    ) from e

from ...brokers import mask_url
from ...errors import ConnectionError as DjqueueConnectionError
from ..base import RateLimitBackend

T = TypeVar("T")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] slots; ARGV token, limit, ttl
SEMAPHORE_ACQUIRE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
"""
)

# KEYS[1] bucket; ARGV limit, interval
BUCKET_TAKE = (
    _NOW
    + """
local limit = tonumber(ARGV[1])
local rate = limit / tonumber(ARGV[2])
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = limit
if saved[1] then
  tokens = math.min(limit, tonumber(saved[1]) + math.max(0, now - tonumber(saved[2])) * rate)
end
local admitted = 0
if tokens >= 1 then
  tokens = tokens - 1
  admitted = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((limit - tokens) / rate) + 1)
return admitted
"""
)

# KEYS[1] admissions; ARGV token, limit, window
WINDOW_ADD = (
    _NOW
    + """
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], window)
return 1
"""
)

# KEYS[1] unique key, KEYS[2] owner link; ARGV owner, ttl
UNIQUE_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], KEYS[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] unique key, KEYS[2] owner link; ARGV owner
UNIQUE_RELEASE = """
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS[1] owner link; ARGV owner
UNIQUE_RELEASE_OWNER = """
local key = redis.call('GET', KEYS[1])
if not key then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('GET', key) == ARGV[1] then return redis.call('DEL', key) end
return 0
"""


class RedisBackend(RateLimitBackend):
    """Rate limits and unique keys in Redis. A ``redis://`` URL in RATE_LIMIT_BACKEND."""

    name = "redis"

    def __init__(self, client: redis.Redis, *, namespace: str = "djqueue:", url: str = "") -> None:
        self.client = client
        self.namespace = namespace
        self.url = url
        register = client.register_script
        self._semaphore_acquire = register(SEMAPHORE_ACQUIRE)
        self._bucket_take = register(BUCKET_TAKE)
        self._window_add = register(WINDOW_ADD)
        self._unique_claim = register(UNIQUE_CLAIM)
        self._unique_release = register(UNIQUE_RELEASE)
        self._unique_release_owner = register(UNIQUE_RELEASE_OWNER)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "djqueue:", **options: Any) -> RedisBackend:
        """Does not connect: the first operation does."""
        options.setdefault("socket_timeout", 10)
        options.setdefault("socket_connect_timeout", 5)
        options.setdefault("health_check_interval", 30)
        return cls(redis.Redis.from_url(url, **options), namespace=namespace, url=url)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # A TimeoutError (a hung server) is no ConnectionError in redis-py, but is one
            # to djqueue: callers handle only djqueue's errors.
            raise DjqueueConnectionError(
                f"cannot reach the rate-limit Redis at {mask_url(self.url)}: {e}; "
                "check DJQUEUE['RATE_LIMIT_BACKEND'] (or the broker URL) and that Redis is running"
            ) from e

    def _key(self, key: str) -> str:
        return self.namespace + key

    def _owner_key(self, owner: str) -> str:
        return f"{self.namespace}unique-owner:{owner}"

    def semaphore_acquire(self, key: str, token: str, *, limit: int, ttl: int) -> bool:
        keys = [self._key(key)]
        return bool(self._call(lambda: self._semaphore_acquire(keys=keys, args=[token, limit, ttl])))

    def semaphore_release(self, key: str, token: str) -> None:
        self._call(lambda: self.client.zrem(self._key(key), token))

    def bucket_take(self, key: str, *, limit: int, interval: int) -> bool:
        keys = [self._key(key)]
        return bool(self._call(lambda: self._bucket_take(keys=keys, args=[limit, interval])))

    def window_add(self, key: str, token: str, *, limit: int, window: int) -> bool:
        keys = [self._key(key)]
        return bool(self._call(lambda: self._window_add(keys=keys, args=[token, limit, window])))

    def unique_claim(self, key: str, owner: str, *, ttl: int) -> bool:
        keys = [self._key(key), self._owner_key(owner)]
        return bool(self._call(lambda: self._unique_claim(keys=keys, args=[owner, ttl])))

    def unique_holder(self, key: str) -> str | None:
        value = self._call(lambda: self.client.get(self._key(key)))
        return value.decode() if isinstance(value, bytes) else value

    def unique_release(self, key: str, owner: str) -> bool:
        keys = [self._key(key), self._owner_key(owner)]
        return bool(self._call(lambda: self._unique_release(keys=keys, args=[owner])))

    def unique_release_owner(self, owner: str) -> bool:
        keys = [self._owner_key(owner)]
        return bool(self._call(lambda: self._unique_release_owner(keys=keys, args=[owner])))

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RedisBackend({mask_url(self.url)!r}, namespace={self.namespace!r})"
