"""The database broker's background threads, one of each per broker while it has
consumers: ``Maintenance`` renews leases and deletes acked rows; on PostgreSQL,
``Listener`` wakes consumers on notifications and ``Watchdog`` cuts a consumer's call
that the server does not answer."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, InterfaceError, connections

from .database_consumer import ACK_FLUSH_INTERVAL
from .database_sql import CHANNEL

if TYPE_CHECKING:
    from .database import DatabaseBroker

logger = logging.getLogger("djqueue.broker.database")

# A LISTEN connection silent for this long (s) is asked a query, which must be answered
# within PROBE_TIMEOUT (s): a server that stopped answering (hung, or its host or the
# network gone without closing the connection) would otherwise leave the consumers
# waking only every MAX_IDLE, for as long as TCP takes to notice (hours, by default).
LISTEN_CHECK = 30.0
PROBE_TIMEOUT = 10.0


class Maintenance(threading.Thread):
    """Renews the leases of every consumer's held messages each lease/3, and deletes
    acked rows that waited ACK_FLUSH_INTERVAL."""

    def __init__(self, broker: DatabaseBroker) -> None:
        super().__init__(name=f"djqueue-db-heartbeat-{broker.alias}", daemon=True)
        self.broker = broker
        self.interval = broker.lease / 3000
        self.cond = threading.Condition()
        self.stopping = False
        self.poked = False

    def poke(self) -> None:
        with self.cond:
            self.poked = True
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.join(5)

    def run(self) -> None:
        next_beat = time.monotonic() + self.interval
        while True:
            with self.cond:
                timeout = next_beat - time.monotonic()
                if self.poked:
                    timeout = min(timeout, ACK_FLUSH_INTERVAL / 2)
                if timeout > 0 and not self.stopping:
                    self.cond.wait(timeout)
                if self.stopping:
                    return
                self.poked = False
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat = time.monotonic() + self.interval
            waiting = False
            for consumer in self.broker.consumers():
                try:
                    waiting |= consumer.flush_acks(older_than=ACK_FLUSH_INTERVAL / 2)
                    if beat:
                        consumer.renew()
                except (DatabaseError, InterfaceError):
                    logger.warning("database broker heartbeat failed; trying again", exc_info=True)
                except Exception:
                    # This thread renews every consumer's leases and deletes their acks:
                    # if it died, long jobs would be delivered again while they run.
                    logger.exception("database broker heartbeat failed; trying again")
            if waiting:
                self.poke()


class Watchdog(threading.Thread):
    """PostgreSQL: cuts the connection of a consumer whose call (claim, ack, heartbeat)
    has waited over a third of the lease for the server. psycopg waits for ever for a
    server that hangs or whose host or network path is gone without closing the
    connection (after a failover, say), and TCP takes about 15 minutes to give up: the
    consumer, and the heartbeat that shares its connection, would stall that long, and
    the messages it holds would run again elsewhere once their leases ran out."""

    def __init__(self, broker: DatabaseBroker) -> None:
        super().__init__(name=f"djqueue-db-watchdog-{broker.alias}", daemon=True)
        self.broker = broker
        # A third of a lease: a stuck claim or ack is cut before the held messages' leases
        # run out, and the heartbeat waiting behind it renews them on the new connection.
        self.limit = broker.lease / 3000
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)

    def run(self) -> None:
        while not self.stopping.wait(max(self.limit / 4, 0.05)):
            for consumer in self.broker.consumers():
                consumer.db.cut_if_stuck(self.limit)


class Listener(threading.Thread):
    """PostgreSQL: LISTENs on a connection of its own and wakes the consumers of each
    queue named in a notification. Enqueues notify in their own transaction, so a
    notification arrives at commit, and never for a rolled back message."""

    def __init__(self, broker: DatabaseBroker) -> None:
        super().__init__(name=f"djqueue-db-listen-{broker.alias}", daemon=True)
        self.broker = broker
        self.stopping = threading.Event()
        # stop() writes to one end to interrupt the wait for notifications.
        self.interrupt, self.interrupter = socket.socketpair()
        # The server process of the current LISTEN connection (None: not connected).
        self.backend_pid: int | None = None

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.interrupter.send(b"x")
        except OSError:
            pass  # the thread has ended and closed it
        self.join(PROBE_TIMEOUT + 1)  # a probe in progress ends by then

    def run(self) -> None:
        try:
            self._listen()
        finally:
            self.interrupt.close()
            self.interrupter.close()

    def _listen(self) -> None:
        import psycopg

        backoff = 0.1
        while not self.stopping.is_set():
            conn = None
            try:
                params = connections.create_connection(self.broker.alias).get_connection_params()
                params.setdefault("connect_timeout", 10)
                conn = psycopg.Connection.connect(**params, autocommit=True)
                conn.execute(f"LISTEN {CHANNEL}")
                self.backend_pid = conn.info.backend_pid
                self.broker.wake()  # whatever was sent before we listened
                backoff = 0.1
                with selectors.DefaultSelector() as selector:
                    selector.register(conn.fileno(), selectors.EVENT_READ)
                    selector.register(self.interrupt, selectors.EVENT_READ)
                    while not self.stopping.is_set():
                        if not selector.select(LISTEN_CHECK):
                            _probe(conn)
                        for notify in conn.notifies(timeout=0):
                            self.broker.wake(notify.payload)
            except Exception as e:
                if self.stopping.is_set():
                    break
                logger.warning(
                    "LISTEN connection of db://%s failed (%s); again in %.1f s", self.broker.alias, e, backoff
                )
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.backend_pid = None
                if conn is not None:
                    conn.close()


def _probe(conn: Any) -> None:
    """Run a query on ``conn``, raising if the server does not answer it within
    PROBE_TIMEOUT: psycopg would wait for ever, so a timer shuts the socket down."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    cut = threading.Event()

    def cut_off() -> None:
        cut.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes psycopg's wait with an error
        except OSError:
            pass

    timer = threading.Timer(PROBE_TIMEOUT, cut_off)
    timer.daemon = True
    timer.start()
    try:
        conn.execute("SELECT 1")
    except Exception:
        if cut.is_set():
            raise TimeoutError(f"the server did not answer within {PROBE_TIMEOUT:g} s") from None
        raise
    finally:
        timer.cancel()
        timer.join()  # a cut_off() already running must be done with the socket
        sock.close()  # the duplicate only
