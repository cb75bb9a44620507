"""Runs the Redis broker's Lua scripts with as little client work per call as possible.

redis-py's general path costs several loopback round trips' worth of Python per call
(a pool checkout that polls the socket, argument encoding, instrumentation), which is
most of the cost of a send. Every broker call is one known script, so here a call is
one ``EVALSHA`` packed straight into RESP from a constant per-script prefix, sent on a
connection this runner keeps checked out of redis-py's pool between calls. Connecting,
TLS, authentication, timeouts and reply parsing stay redis-py's.

A connection that sat unused for over IDLE_CHECK is polled before use, as redis-py's
pool does on every checkout: one the server closed meanwhile (a restart, its client
``timeout``, ``CLIENT KILL``) is reconnected before anything is sent on it. A call
that fails drops its connection and every idle one (after a restart they are all
dead), so that the broker's retry of a call that is safe to repeat gets a fresh one.

A send (``run(..., spin=True)``) polls its socket for the reply for up to SPIN before it
sleeps in a blocking read. On a virtual machine, waking a thread that slept in ``recv``
costs more than Redis takes to run the script (on the 2-vCPU machine the benchmarks ran
on, 75 against 25 microseconds a round trip), and a producer has nothing else to do
meanwhile. A reply that took longer than SPIN (Redis across a network, a busy server)
makes the next sends sleep straight away: 8 of them, twice as many after each further
slow reply up to 1,024, back to 8 after a quick one. So a slow link costs one SPIN
every 1,024 sends, and a preempted reply on a fast one costs little. A worker's calls
(fetch, ack) do not poll: its other threads have work to do with that CPU. Nor does a
process that may run on one CPU only: there a send that polls takes turns with what
must run for the reply to come (Redis itself, when it is local), and waking a thread on
the CPU it slept on is quick (measured with both on one CPU: 55 microseconds a send with
a blocking read, 63 polling).
"""

from __future__ import annotations

import hashlib
import os
import select
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# redis-py's socket timeout when a client was built without one: None before 8.0, 5 s
# since. Assuming 5 costs a round trip now and then; assuming None would let every
# blocking wait over 5 s fail.
ASSUMED_SOCKET_TIMEOUT = 5.0


def block_limit(client: Any) -> float | None:
    """The longest single blocking command (BLMOVE, BLPOP), in seconds, that ``client``'s
    socket timeout allows, whether it came from a keyword or the URL; None if reads never
    time out."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    socket_timeout = kwargs.get("socket_timeout", ASSUMED_SOCKET_TIMEOUT)
    if socket_timeout is None:
        return None
    # Leave time for the reply to travel and for Redis, which ends blocked commands on
    # its clock tick (up to 100 ms late at the default hz).
    return max(socket_timeout - 1, socket_timeout / 2)


# Seconds a connection may sit unused before it is checked for a server-side close.
IDLE_CHECK = 0.1


# Seconds a send polls for its reply before sleeping, and how many sends sleep straight
# away after a reply took longer (doubling from the first to the second while they do).
SPIN = 0.0002
SPIN_SKIP = (8, 1024)


def _bulk(value: Any) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):  # bool too
        data = b"%d" % value
    else:
        raise TypeError(f"cannot pass {type(value).__name__} to a Redis script: {value!r}")
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack_four(a: bytes, b: bytes, c: bytes, d: bytes) -> bytes:
    """Four arguments packed ahead of a ``pack()`` in one format (a message's fields)."""
    return _PACK_FOUR % (len(a), a, len(b), b, len(c), c, len(d), d)


_PACK_FOUR = b"$%d\r\n%b\r\n" * 4


def _cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _poller(sock: Any) -> Any:
    """A zero-timeout readiness check for ``sock``, or None where polling must not be
    done: no socket yet, or one of gevent's or eventlet's, whose loop a send that polls
    would hold up (under their monkey-patching, ``select.poll`` may be gone too)."""
    if sock is None or type(sock).__module__ not in ("socket", "ssl") or not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return poller.poll


class ScriptRunner:
    """Runs named scripts; ``prefix`` is passed as every script's first argument."""

    def __init__(self, client: Any, prefix: str, sources: Mapping[str, str]) -> None:
        from redis.exceptions import NoScriptError, ResponseError

        self._no_script = NoScriptError
        self._response_error = ResponseError
        self.pool = client.connection_pool
        self.sources = dict(sources)
        self.shas = {
            name: hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
            for name, source in sources.items()
        }
        # Everything before a call's own arguments: the command, the sha, no keys, the prefix.
        self.heads = {
            name: _bulk("EVALSHA") + _bulk(sha) + _bulk(0) + _bulk(prefix) for name, sha in self.shas.items()
        }
        # Connections checked out of the pool and free to use, with when they were last used.
        self.idle: list[tuple[Any, float]] = []
        self.pid = os.getpid()
        # Sends left to sleep straight away after a slow reply, and how many the next slow
        # one skips (racy across threads, harmlessly).
        self.spin_skip = 0
        self.spin_backoff = SPIN_SKIP[0]
        self.polls = _cpus() > 1

    def pack(self, name: str, args: Sequence[Any], packed: Sequence[bytes] = (), count: int = 0) -> bytes:
        """The call's RESP bytes: ``args``, then ``count`` more arguments already packed
        (see ``pack_four``)."""
        return b"".join([b"*%d\r\n" % (len(args) + count + 4), self.heads[name], *map(_bulk, args), *packed])

    def run(self, name: str, args: Sequence[Any], *, spin: bool = False) -> Any:
        """Run one script and return its reply; raises redis-py's exceptions. ``spin``:
        poll for the reply before sleeping on it (see the module's docstring)."""
        packed = [self.pack(name, args)]
        connection = self._take()
        try:
            try:
                connection.send_packed_command(packed)
                if spin and self.polls:
                    self._spin(connection)
                reply = connection.read_response(disable_decoding=True)
            except self._no_script:
                self._load(connection, {name})
                connection.send_packed_command(packed)
                reply = connection.read_response(disable_decoding=True)
        except self._response_error:  # an error reply: the connection is still in step
            self.idle.append((connection, time.monotonic()))
            raise
        except BaseException:
            self._drop(connection)
            raise
        self.idle.append((connection, time.monotonic()))
        return reply

    def run_many(self, calls: Iterable[tuple[str, bytes]], replies: list[Any] | None = None) -> list[Any]:
        """Run scripts (name, ``pack()``-ed call) pipelined on one connection and return
        their replies, in order. Each call is sent as soon as the iterable gives it, so
        that Redis runs one while the next is packed. If any failed, raises the first
        error once every reply has been read. ``replies``, if given, receives each reply
        as it is read: after a lost connection, ``ran(replies)`` of the calls ran."""
        replies = [] if replies is None else replies
        connection = self._take()
        try:
            sent: list[tuple[str, bytes]] = []
            for name, packed in calls:
                connection.send_packed_command([packed])
                sent.append((name, packed))
            self._read_replies(connection, len(sent), replies)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, self._no_script)]
            if missing:
                self._load(connection, {sent[i][0] for i in missing})
                again = self._exchange(connection, [sent[i][1] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException:
            self._drop(connection)
            raise
        self.idle.append((connection, time.monotonic()))
        for reply in replies:
            if isinstance(reply, self._response_error):
                raise reply
        return replies

    def _spin(self, connection: Any) -> None:
        """Return once ``connection`` has something to read, or after SPIN."""
        if self.spin_skip:
            self.spin_skip -= 1
            return
        sock = getattr(connection, "_sock", None)
        poller = getattr(connection, "_djqueue_poller", None)
        if poller is None or poller[0] is not sock:
            poller = (sock, _poller(sock))
            connection._djqueue_poller = poller
        if poller[1] is None:
            return
        poll = poller[1]
        clock = time.perf_counter
        deadline = clock() + SPIN
        while not poll(0):
            if clock() > deadline:
                self.spin_skip = self.spin_backoff
                self.spin_backoff = min(2 * self.spin_backoff, SPIN_SKIP[1])
                return
        self.spin_backoff = SPIN_SKIP[0]

    def ran(self, replies: list[Any]) -> int:
        """How many calls of a ``run_many`` that failed are known to have run: those before
        the first reply missing or refused for a script Redis did not have."""
        for i, reply in enumerate(replies):
            if isinstance(reply, self._no_script):
                return i
        return len(replies)

    def _exchange(self, connection: Any, packed: list[bytes]) -> list[Any]:
        connection.send_packed_command(packed)
        return self._read_replies(connection, len(packed))

    def _read_replies(self, connection: Any, count: int, replies: list[Any] | None = None) -> list[Any]:
        replies = [] if replies is None else replies
        for _ in range(count):
            try:
                replies.append(connection.read_response(disable_decoding=True))
            except self._response_error as e:  # an error reply: the connection is still in step
                replies.append(e)
        return replies

    def _load(self, connection: Any, names: Iterable[str]) -> None:
        # Redis restarted, or its script cache was flushed.
        for name in names:
            connection.send_command("SCRIPT", "LOAD", self.sources[name], check_health=False)
            connection.read_response()

    def _take(self) -> Any:
        if self.pid != os.getpid():
            # A forked child must not share its parent's sockets; the pool resets itself.
            self.idle, self.pid = [], os.getpid()
        try:
            connection, since = self.idle.pop()
        except IndexError:
            return self.pool.get_connection()
        if time.monotonic() - since > IDLE_CHECK:
            try:
                # Readable means closed by the server (or out of step): start afresh.
                stale = connection.can_read()
            except Exception:
                stale = True
            if stale:
                connection.disconnect()
        return connection

    def _drop(self, connection: Any) -> None:
        # It may hold unread replies: never use it again. After a failure the idle ones
        # are likely dead too (a restart), so that a retry starts afresh.
        self._release(connection)
        self.close()

    def _release(self, connection: Any) -> None:
        connection.disconnect()
        self.pool.release(connection)

    def close(self) -> None:
        """Give every idle connection back to the pool, disconnected."""
        while True:
            try:  # one pop at a time: another thread may be taking one meanwhile
                connection, _ = self.idle.pop()
            except IndexError:
                return
            self._release(connection)
