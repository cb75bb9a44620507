"""DbConnections: a worker thread's database connections are handled as around a request."""

from __future__ import annotations

import pytest
from django.db import connection, connections

from djqueue import Worker, actor
from tests.testapp.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)


def run(broker, *actors) -> None:
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    for a in actors:
        a.send()
    worker.start()
    try:
        worker.join(timeout=10_000)
    finally:
        worker.stop(timeout=5_000)


def test_a_connection_is_closed_after_each_message(stub_broker):
    # CONN_MAX_AGE = 0 (the default): closed when the message is settled, as after a request.
    used = []

    @actor(broker=stub_broker, actor_name="query")
    def query() -> None:
        Execution.objects.exists()
        used.append((connections["default"], connection.connection))  # this thread's wrapper

    @actor(broker=stub_broker, actor_name="no_query")
    def no_query() -> None:
        pass

    run(stub_broker, query, no_query, query, no_query)
    assert len(used) == 2
    (wrapper, first), (_, second) = used
    assert first is not None and second is not None and first is not second, "a new connection each time"
    assert wrapper.connection is None, "closed after the last message"


def test_a_persistent_connection_is_kept_between_messages(stub_broker, monkeypatch):
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 60)
    used = []

    @actor(broker=stub_broker, actor_name="query")
    def query() -> None:
        Execution.objects.exists()
        used.append(connection.connection)

    @actor(broker=stub_broker, actor_name="no_query")
    def no_query() -> None:
        pass

    run(stub_broker, query, no_query, query)
    assert len(used) == 2 and used[0] is used[1], "reused within CONN_MAX_AGE"


def test_an_unusable_connection_is_replaced_before_the_next_message(stub_broker, monkeypatch):
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 60)
    used = []

    @actor(broker=stub_broker, actor_name="break_it")
    def break_it() -> None:
        Execution.objects.exists()
        used.append(connection.connection)
        # Left with autocommit off, as a crashed transaction might: Django drops it.
        connection.set_autocommit(False)

    @actor(broker=stub_broker, actor_name="query")
    def query() -> None:
        Execution.objects.exists()
        used.append(connection.connection)

    run(stub_broker, break_it, query)
    assert len(used) == 2 and used[0] is not used[1]
