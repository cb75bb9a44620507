"""The Redis rate-limit backend reports an unreachable or hung Redis as djqueue's
ConnectionError, the one error its callers handle."""

from __future__ import annotations

import socket
import time

import pytest

from djqueue.errors import ConnectionError
from djqueue.rate_limits.backends.redis import RedisBackend


@pytest.mark.parametrize("listening", [False, True], ids=["nothing-listens", "never-answers"])
def test_a_redis_that_cannot_be_reached_or_never_answers_raises_djqueue_connection_error(listening):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        if listening:
            # The kernel completes the handshake; no reply ever comes, as from a hung server.
            server.listen(8)
        port = server.getsockname()[1]
        backend = RedisBackend.from_url(f"redis://:secret@127.0.0.1:{port}/0", socket_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="cannot reach the rate-limit Redis") as raised:
            backend.bucket_take("k", limit=1, interval=1000)
        assert time.monotonic() - start < 3
        assert "secret" not in str(raised.value)
        backend.close()
