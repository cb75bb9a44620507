"""What is particular to the database broker (db://), on SQLite and PostgreSQL: batch
claims under concurrency, leases and heartbeats, transactional enqueue, NOTIFY wake-ups.
The behaviour every broker shares is proved in test_contract.py."""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import InterfaceError, OperationalError, connections, transaction

from djqueue import Message, Worker, actor, errors, get_current_message
from djqueue.brokers import broker_from_url, database_consumer, database_threads
from djqueue.brokers.base import Consumer, MessageProxy
from djqueue.brokers.database import DatabaseBroker
from djqueue.brokers.database_sql import ISOLATE_AFTER, Statements
from djqueue.checks import _check_url
from djqueue.errors import ConfigurationError
from djqueue.message import current_millis
from djqueue.models import DeadLetter, QueuedMessage
from tests.process import ROOT, free_port, wait_for
from tests.relay import Relay

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])

ALIASES = ["default", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ALIASES)
def alias(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def queue() -> str:
    return f"db_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make(alias: str) -> Iterator[Callable[..., DatabaseBroker]]:
    """Build brokers on ``alias`` (each one stands for a process) and close them all after."""
    brokers: list[DatabaseBroker] = []

    def make(**options: Any) -> DatabaseBroker:
        broker = DatabaseBroker.from_url(f"db://{alias}", **options)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


def message(queue: str, n: object = None, **options: Any) -> Message:
    return Message(queue_name=queue, actor_name="record", args=(n,), kwargs={}, options=options)


def take(consumer: Consumer, timeout: float = 10.0) -> MessageProxy:
    return wait_for(lambda: next(consumer), timeout=timeout, interval=0, message="a message")


def rows(alias: str, queue: str) -> int:
    return QueuedMessage.objects.using(alias).filter(queue_name=queue).count()


def test_enqueue_consume_ack(make, alias, queue):
    broker = make()
    sent = [broker.enqueue(message(queue, n)) for n in range(3)]
    consumer = broker.consume(queue, prefetch=10, timeout=200)
    got = [take(consumer) for _ in range(3)]
    assert [p.message_id for p in got] == [m.message_id for m in sent]
    assert [p.delivery_count for p in got] == [1, 1, 1]
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 3)
    for proxy in got:
        consumer.ack(proxy)
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 0)
    assert rows(alias, queue) == 0
    consumer.close()


def test_an_ack_is_deleted_promptly_and_never_before_it_is_made(make, alias, queue):
    broker = make()
    broker.enqueue(message(queue))
    consumer = broker.consume(queue, prefetch=2, timeout=200)
    proxy = take(consumer)
    assert next(consumer) is None  # 200 ms pass with the message held
    assert rows(alias, queue) == 1
    consumer.ack(proxy)
    acked = time.monotonic()
    # Nobody calls next() or get_queue_stats(): the broker's own thread deletes it.
    wait_for(lambda: rows(alias, queue) == 0, timeout=2, interval=0.005, message="the ack")
    assert time.monotonic() - acked < 0.5
    consumer.close()


def test_two_consumers_never_claim_the_same_message(make, queue):
    sent = {m.message_id for m in make().enqueue_many([message(queue, n) for n in range(300)])}
    held: list[list[str]] = [[], []]
    start, stop = threading.Barrier(2), threading.Barrier(2)

    def consume(index: int) -> None:
        # Each consumer is its own broker, as in two processes; neither acks, so each
        # claim races the other's for the remaining rows.
        consumer = make().consume(queue, prefetch=160, timeout=100)
        start.wait()
        deadline = time.monotonic() + 20
        while len(held[0]) + len(held[1]) < 300 and time.monotonic() < deadline:
            proxy = next(consumer)
            if proxy is not None:
                held[index].append(proxy.message_id)
        # Closing gives the held messages back: the other consumer, still fetching,
        # would rightly take them.
        stop.wait(30)
        consumer.close()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    first, second = set(held[0]), set(held[1])
    assert len(first) == len(held[0]) and len(second) == len(held[1])
    assert not first & second, "a message was claimed by both consumers"
    assert first | second == sent
    assert len(first) >= 140 and len(second) >= 140  # neither could hold more than 160


def test_priority_then_age_order_within_a_batch(make, queue):
    broker = make()
    for n, priority in enumerate([0, 5, 10, 5, 0]):
        broker.enqueue(message(queue, n, priority=priority))
    consumer = broker.consume(queue, prefetch=10, timeout=200)
    got = [take(consumer) for _ in range(5)]  # claimed in one batch
    assert [(p.message.priority, p.message.args[0]) for p in got] == [(10, 2), (5, 1), (5, 3), (0, 0), (0, 4)]
    consumer.close()


def test_delayed_messages_wait_and_come_in_eta_order(make, queue):
    broker = make()
    later = broker.enqueue(message(queue, "later"), delay=400)
    sooner = broker.enqueue(message(queue, "sooner"), delay=200)
    consumer = broker.consume(queue, prefetch=10, timeout=50)
    assert next(consumer) is None, "a delayed message came early"
    wait_for(lambda: broker.get_queue_stats(queue).delayed == 0, message="both due")
    now = broker.enqueue(message(queue, "now"), delay=None)
    got = [take(consumer).message_id for _ in range(3)]  # claimed in one batch
    assert got == [sooner.message_id, later.message_id, now.message_id]
    consumer.close()


def test_enqueue_in_a_rolled_back_transaction_is_rolled_back(make, alias, queue):
    broker = make()
    consumer = broker.consume(queue, prefetch=1, timeout=300)
    with pytest.raises(RuntimeError), transaction.atomic(using=alias):
        broker.enqueue(message(queue, "single"))
        broker.enqueue_many([message(queue, n) for n in range(3)])
        assert rows(alias, queue) == 4  # visible inside the transaction
        raise RuntimeError("roll back")
    assert rows(alias, queue) == 0
    assert next(consumer) is None
    with transaction.atomic(using=alias):
        kept = broker.enqueue(message(queue, "kept"))
    assert take(consumer).message_id == kept.message_id
    consumer.close()


def test_malformed_row_is_yielded_as_a_malformed_proxy(make, alias, queue):
    broker = make(middleware=[])  # no DeadLetters: nack drops the row
    QueuedMessage.objects.using(alias).create(
        queue_name=queue, message_id="x", available_at=0, payload=b"\xffnot json", created_at=0
    )
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    proxy = take(consumer)
    assert proxy.decode_error is not None and proxy.failed
    assert proxy.data == b"\xffnot json" and proxy.delivery_count == 1
    consumer.nack(proxy)
    consumer.close()
    assert rows(alias, queue) == 0


def test_cancel_purge_and_stats(make, alias, queue):
    broker = make()
    first = broker.enqueue(message(queue, 1))
    second = broker.enqueue(message(queue, 2))
    delayed = broker.enqueue(message(queue, 3), delay=60_000)
    assert broker.get_queue_stats(queue) == (2, 1, 0, 0)
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    claimed = take(consumer)
    assert claimed.message_id == first.message_id
    assert broker.get_queue_stats(queue) == (1, 1, 1, 0)
    assert broker.cancel(first.message_id) is False, "a claimed message was cancelled"
    assert broker.cancel(delayed.message_id, queue_name="elsewhere") is False
    assert broker.cancel(delayed.message_id, queue_name=queue) is True
    DeadLetter.objects.create(message_id=str(uuid.uuid4()), queue_name=queue, actor_name="record")
    assert broker.get_queue_stats(queue) == (1, 0, 1, 1)
    broker.purge(queue)
    assert broker.get_queue_stats(queue) == (0, 0, 1, 1), "purge took an in-flight message"
    assert broker.cancel(second.message_id) is False
    consumer.ack(claimed)
    consumer.close()
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 0)


def test_requeue_and_close_give_back_without_counting_a_delivery(make, alias, queue):
    broker = make()
    for n in range(2):
        broker.enqueue(message(queue, n))
    consumer = broker.consume(queue, prefetch=2, timeout=200)
    first, second = take(consumer), take(consumer)
    consumer.requeue([first])
    assert broker.get_queue_stats(queue)[:3] == (1, 0, 1)
    consumer.close()  # second is unacked: it goes back too
    assert broker.get_queue_stats(queue)[:3] == (2, 0, 0)
    again = broker.consume(queue, prefetch=2, timeout=200)
    got = {p.message_id: p.delivery_count for p in (take(again), take(again))}
    assert got == {first.message_id: 1, second.message_id: 1}
    again.close()


def test_the_heartbeat_keeps_a_long_jobs_lease(make, alias, queue):
    holder = make(lease=300)
    holder.enqueue(message(queue))
    consumer = holder.consume(queue, prefetch=1, timeout=100)
    proxy = take(consumer)
    rival = make(lease=300).consume(queue, prefetch=1, timeout=1500)
    assert next(rival) is None, "the message was taken while its job ran (5 leases long)"
    assert holder.get_queue_stats(queue)[:3] == (0, 0, 1)
    consumer.ack(proxy)
    consumer.close()
    assert rows(alias, queue) == 0
    rival.close()


def test_an_acked_message_whose_lease_ran_out_is_deleted_not_claimed_again(alias, queue):
    # Acks wait in the consumer while the database is unreachable, and the lease of an
    # acked message may run out meanwhile: the claim that finally carries the ack must
    # delete that row, not lease it again (its job would run twice).
    now = current_millis()
    acked = QueuedMessage.objects.using(alias).create(
        queue_name=queue,
        message_id="acked",
        available_at=now - 1000,
        payload=b"{}",
        created_at=now - 60_000,
        delivery_count=1,
        lease_owner="owner-a",
    )
    with connections[alias].cursor() as cursor:
        claimed = Statements(connections[alias].vendor).claim(
            cursor, queue, "owner-a", 5, now, now + 30_000, [acked.id]
        )
    assert claimed.rows == []
    assert rows(alias, queue) == 0


def test_close_waits_for_acks_another_thread_is_deleting(make, alias, queue, monkeypatch):
    # The maintenance thread takes a consumer's acks, then deletes them on the consumer's
    # connection. A close() in between closed that connection: the delete failed, and
    # the finished job ran again once its lease ran out.
    monkeypatch.setattr(database_threads, "ACK_FLUSH_INTERVAL", 1000.0)  # this test flushes
    broker = make()
    broker.enqueue(message(queue))
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    consumer.ack(take(consumer))
    run = consumer.db.run
    entered, release = threading.Event(), threading.Event()

    def slow_run(work: Any) -> Any:
        if threading.current_thread() is flusher:
            entered.set()
            release.wait(10)
        return run(work)

    monkeypatch.setattr(consumer.db, "run", slow_run)
    flusher = threading.Thread(target=consumer.flush_acks)
    flusher.start()
    entered.wait(10)
    threading.Timer(0.1, release.set).start()  # stages the race: close() runs meanwhile
    consumer.close()
    flusher.join(10)
    assert rows(alias, queue) == 0, "the acked message is still queued"


def test_the_maintenance_thread_outlives_an_error_it_did_not_expect(make, alias, queue, monkeypatch):
    # It renews every consumer's leases and deletes their acks; Django's InterfaceError
    # (a closed connection) is no DatabaseError, and it ended the thread.
    broker = make(lease=600)  # it beats every 200 ms
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    flush_acks, failed = consumer.flush_acks, []

    def fails_once(older_than: float | None = None) -> bool:
        if not failed:
            failed.append(True)
            raise InterfaceError("the consumer is closed")
        return flush_acks(older_than=older_than)

    monkeypatch.setattr(consumer, "flush_acks", fails_once)
    broker.enqueue_many([message(queue, n) for n in range(2)])
    first, second = take(consumer), take(consumer)
    consumer.ack(first)  # wakes the maintenance thread, which fails
    wait_for(lambda: failed, message="the maintenance thread's failure")
    consumer.ack(second)
    # Nobody claims again: only the maintenance thread deletes the acks, at its next beat.
    wait_for(lambda: rows(alias, queue) == 0, timeout=5, interval=0.01, message="the acks")
    consumer.close()


def test_a_failed_give_back_of_skipped_messages_does_not_fail_the_consumer(make, alias, queue, monkeypatch):
    # A claim may return several much-delivered messages; the consumer keeps one and
    # gives the others back. If that give-back fails, next() must not raise: the worker
    # would replace the consumer, and closing it gives back the messages being run.
    broker = make()
    now = current_millis()
    for n in range(3):
        QueuedMessage.objects.using(alias).create(
            queue_name=queue,
            message_id=f"m{n}",
            available_at=now - 1000,
            payload=message(queue, n).encode(),
            created_at=now - 60_000,
            delivery_count=ISOLATE_AFTER + 1,
        )
    consumer = broker.consume(queue, prefetch=4, timeout=0)

    def unreachable(*args: Any) -> None:
        raise OperationalError("the database went away")  # a real outage cannot be timed here

    monkeypatch.setattr(broker.sql, "requeue", unreachable)
    proxy = take(consumer)
    assert proxy.delivery_count == ISOLATE_AFTER + 2
    monkeypatch.undo()
    consumer.ack(proxy)
    consumer.close()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_payloads_and_arguments_with_nul_characters_are_dead_lettered_on_postgresql(make, queue, settings):
    settings.DATABASE_ROUTERS = ["tests.routers.DeadLettersOnPostgres"]
    broker = make()

    @actor(broker=broker, actor_name="refuses_nul", queue_name=queue, max_retries=0)
    def refuses_nul(text: str) -> None:
        raise ValueError(f"no NUL in {text}, please")

    refuses_nul.send("a\x00b")
    broker.enqueue_raw(queue, b"\x00\xff\xfe<script>")
    worker = Worker(broker, queues=[queue], worker_threads=1)
    worker.start()
    try:
        dead = DeadLetter.objects.using("postgres").filter(queue_name=queue)
        wait_for(lambda: dead.count() == 2, message="both dead letters")
        wait_for(lambda: rows("postgres", queue) == 0, message="the queue to empty")
    finally:
        worker.stop(5_000)
    row = dead.get(actor_name="refuses_nul")
    assert row.args == ["a\ufffdb"] and "a\ufffdb" in row.exception_message
    assert dead.get(actor_name="").raw_payload.startswith("\ufffd")


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_message_whose_dead_letter_cannot_be_stored_stays_queued(make, queue, settings):
    settings.DATABASE_ROUTERS = ["tests.routers.DeadLettersOnPostgres"]
    broker = make(lease=1000)

    @actor(broker=broker, actor_name="always_fails", queue_name=queue, max_retries=0)
    def always_fails() -> None:
        raise ValueError("broken for good")

    refuse = (
        "CREATE FUNCTION djqueue_test_refuse() RETURNS trigger AS "
        "$$ BEGIN RAISE EXCEPTION 'dead letters refused'; END $$ LANGUAGE plpgsql; "
        f"CREATE TRIGGER djqueue_test_refuse BEFORE INSERT OR UPDATE ON {DeadLetter._meta.db_table} "
        "FOR EACH ROW EXECUTE FUNCTION djqueue_test_refuse()"
    )
    accept = (
        f"DROP TRIGGER IF EXISTS djqueue_test_refuse ON {DeadLetter._meta.db_table}; "
        "DROP FUNCTION IF EXISTS djqueue_test_refuse()"
    )
    with connections["postgres"].cursor() as cursor:
        cursor.execute(refuse)
    worker = Worker(broker, queues=[queue], worker_threads=1)
    worker.start()
    try:
        sent = always_fails.send()
        queued = QueuedMessage.objects.using("postgres").filter(queue_name=queue)
        # Given back for later, not deleted: no lease holds it, and it is not due yet.
        wait_for(
            lambda: queued.filter(lease_owner=None, available_at__gt=current_millis()).exists(),
            message="the message to be given back",
        )
        with connections["postgres"].cursor() as cursor:
            cursor.execute(accept)
        dead = DeadLetter.objects.using("postgres").filter(message_id=sent.message_id)
        wait_for(lambda: dead.exists() and not queued.exists(), message="the dead letter, a lease later")
    finally:
        worker.stop(5_000)
        with connections["postgres"].cursor() as cursor:
            cursor.execute(accept)


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_the_consumers_connection_settings_never_reach_djangos_pool(make, queue, monkeypatch):
    # A consumer commits asynchronously (synchronous_commit = off); with Django's pool,
    # a connection it had given back would make the project's own commits asynchronous.
    settings_dict = connections.settings["postgres"]
    pool = {"min_size": 1, "max_size": 2}
    monkeypatch.setitem(settings_dict, "OPTIONS", {**settings_dict.get("OPTIONS", {}), "pool": pool})
    pooled = connections.create_connection("postgres")
    try:
        broker = make()
        broker.enqueue(message(queue))
        consumer = broker.consume(queue, prefetch=1, timeout=200)
        consumer.ack(take(consumer))
        consumer.close()
        seen = set()
        for _ in range(4):  # round the whole pool
            with pooled.cursor() as cursor:
                cursor.execute("SHOW synchronous_commit")
                seen.add(cursor.fetchone()[0])
            pooled.close()
        assert seen == {"on"}
    finally:
        pooled.close_pool()


def claim_renew_requeue_and_ack(
    broker: DatabaseBroker, queue: str
) -> tuple[database_consumer.DatabaseConsumer, Message]:
    """Run each kind of consumer statement once: send two messages, claim both, renew
    their leases, give the second back and ack the first. Returns the consumer and the
    second message, which is on the queue again."""
    first, second = broker.enqueue(message(queue, 1)), broker.enqueue(message(queue, 2))
    consumer = broker.consume(queue, prefetch=2, timeout=200)
    held = {proxy.message_id: proxy for proxy in (take(consumer), take(consumer))}
    consumer.renew()
    consumer.requeue([held[second.message_id]])
    consumer.ack(held[first.message_id])
    consumer.flush_acks()
    return consumer, second


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
@pytest.mark.parametrize("server_side_binding", [False, True])
def test_a_consumer_commits_asynchronously_without_changing_its_session(
    make, queue, monkeypatch, server_side_binding
):
    # A transaction-mode pooler (PgBouncer) hands the server connection on to other
    # clients after each transaction: a setting left on the consumer's session would make
    # their commits asynchronous too.
    settings_dict = connections.settings["postgres"]
    options = {**settings_dict.get("OPTIONS", {}), "server_side_binding": server_side_binding}
    monkeypatch.setitem(settings_dict, "OPTIONS", options)
    with connections["postgres"].cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        default = cursor.fetchone()[0]
    assert default != "off"
    consumer, second = claim_renew_requeue_and_ack(make(), queue)
    assert list(
        QueuedMessage.objects.using("postgres").filter(queue_name=queue).values_list("message_id", flat=True)
    ) == [second.message_id]

    def setting(cursor: Any) -> str:
        cursor.execute("SELECT current_setting(%s)", ["synchronous_commit"])
        return cursor.fetchone()[0]

    assert consumer.db.run(setting) == "off"  # each of its statements
    with consumer.db.wrapper.cursor() as cursor:  # its session, as a pooler would hand it on
        assert setting(cursor) == default


@pytest.fixture
def pgbouncer() -> Iterator[int]:
    """A PgBouncer of our own in transaction mode, in front of the "postgres" test
    database as ``bounced``, with one server connection that all its clients take turns
    on; its port."""
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        pytest.fail("pgbouncer is not installed (apt-get install pgbouncer)")
    db = connections.settings["postgres"]
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="djqueue-pgbouncer-"))
    directory.chmod(0o755)  # PgBouncer refuses to run as root: it reads these as another user
    password = f" password={db['PASSWORD']}" if db["PASSWORD"] else ""
    (directory / "users.txt").write_text(f'"{db["USER"]}" ""\n')
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"bounced = host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} dbname={db['NAME']} "
        f"user={db['USER']}{password}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {directory / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 1\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    for path in directory.iterdir():
        path.chmod(0o644)
    user = []
    if os.geteuid() == 0:
        user = ["-u", "postgres" if _user_exists("postgres") else "nobody"]
    log = directory / "pgbouncer.log"
    with log.open("wb") as output:
        process = subprocess.Popen([binary, *user, str(ini)], stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _accepts(port) or process.poll() is not None, message="PgBouncer to listen")
        if process.poll() is not None:
            pytest.fail(f"PgBouncer did not start: {log.read_text()[-2000:]}")
        yield port
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_behind_a_transaction_mode_pgbouncer_the_broker_leaves_other_clients_commits_durable(
    pgbouncer, monkeypatch, make, queue
):
    # docs/database-broker.md: point the alias at a transaction-mode pooler, with
    # "listen": False. Every client here shares one server connection, as busy clients
    # of a real pooler end up doing.
    settings_dict = connections.settings["postgres"]
    for key, value in {"HOST": "127.0.0.1", "PORT": pgbouncer, "NAME": "bounced"}.items():
        monkeypatch.setitem(settings_dict, key, value)
    connections["postgres"].close()  # this thread's sends go through the pooler too
    other = connections.create_connection("postgres")

    def other_clients_view(query: str) -> Any:
        with other.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchone()[0]

    try:
        default = other_clients_view("SHOW synchronous_commit")
        assert default != "off"
        consumer, second = claim_renew_requeue_and_ack(make(listen=False), queue)
        again = take(consumer)
        assert again.message_id == second.message_id
        consumer.ack(again)
        consumer.flush_acks()
        assert rows("postgres", queue) == 0
        assert other_clients_view("SHOW synchronous_commit") == default, (
            "another client's commits would not wait for the disk"
        )
        # A statement prepared there would clash with another client's of the same name.
        assert other_clients_view("SELECT count(*) FROM pg_prepared_statements") == 0
    finally:
        other.close()
        connections["postgres"].close()


def synchronous_commit_after(alias: str, claim: Callable[[Any], Any]) -> str:
    """The setting seen right after ``claim(cursor)`` in the same transaction."""
    with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
        claim(cursor)
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_every_kind_of_claim_commits_asynchronously_by_itself(alias, queue):
    # A claim is one statement (so that it can be prepared) that turns synchronous_commit
    # off for its own transaction: whether it leases rows, finds none, only deletes acks
    # (which a synchronous commit would wait on the disk for), or asks when the next
    # message is due.
    sql = Statements("postgresql")
    now = current_millis()

    def row(message_id: str, owner: str | None = None) -> int:
        created = QueuedMessage.objects.using(alias).create(
            queue_name=queue,
            message_id=message_id,
            available_at=now - 1000 if owner is None else now + 30_000,
            payload=b"{}",
            created_at=now - 1000,
            lease_owner=owner,
        )
        return created.id

    def claim(acks: list[int], **options: Any) -> Callable[[Any], Any]:
        return lambda cursor: sql.claim(cursor, queue, "owner-a", 5, now, now + 30_000, acks, **options)

    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        default = cursor.fetchone()[0]
    assert default != "off"
    row("due")
    assert synchronous_commit_after(alias, claim([])) == "off"  # leases a row
    assert synchronous_commit_after(alias, claim([], next_due=True)) == "off"  # none; asks when
    acked = row("acked", owner="owner-a")
    assert synchronous_commit_after(alias, claim([acked])) == "off"  # deletes the ack only
    assert not QueuedMessage.objects.using(alias).filter(id=acked).exists()
    with connections[alias].cursor() as cursor:  # autocommit: the claim is a transaction
        claim([])(cursor)
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == default  # for that transaction only


def prepared_claims(consumer: database_consumer.DatabaseConsumer) -> int:
    def count(cursor: Any) -> int:
        query = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s"
        cursor.execute(query, ["%set_config%"])
        return cursor.fetchone()[0]

    return consumer.db.run(count)


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
@pytest.mark.parametrize("listen", [True, False])
def test_a_listening_consumer_prepares_its_claim_once_on_its_own_connection(make, queue, listen):
    # PostgreSQL plans a prepared claim once per connection instead of on every claim.
    # Only with LISTEN on: behind a transaction-mode pooler, where the docs turn it off,
    # a statement prepared on one server connection is missing from the next.
    broker = make(listen=listen)
    consumer = broker.consume(queue, prefetch=2, timeout=200)
    for n in range(3):
        broker.enqueue(message(queue, n))
        proxy = take(consumer)
        assert proxy.message.args == (n,)
        consumer.ack(proxy)
    consumer.flush_acks()
    assert rows("postgres", queue) == 0
    assert prepared_claims(consumer) == (2 if listen else 0)  # a claim with acks and one without
    consumer.close()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_consumer_whose_prepared_claim_is_lost_claims_unprepared_and_says_why(make, queue, caplog):
    # What a transaction-mode pooler does to a listening consumer: the next transaction
    # runs on another server connection, which never saw the prepared claim. The
    # consumers must go on delivering, not fail every look, and all of the broker's
    # consumers stop preparing, not each only once it has failed too.
    broker = make()
    consumers = {name: broker.consume(name, prefetch=1, timeout=200) for name in (queue, f"{queue}_b")}
    for name, consumer in consumers.items():
        broker.enqueue(message(name, 1))
        consumer.ack(take(consumer))
        consumer.flush_acks()  # the next claim has no acks to carry: the same statement
        assert prepared_claims(consumer) == 1
        consumer.db.run(lambda cursor: cursor.execute(DEALLOCATE_BEHIND_PSYCOPGS_BACK))
    first, second = consumers.values()

    def backend(consumer: database_consumer.DatabaseConsumer) -> int:
        def pid(cursor: Any) -> int:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]

        return consumer.db.run(pid)

    with caplog.at_level("WARNING", logger="djqueue.broker.database"):
        broker.enqueue(message(queue, 2))
        proxy = take(first)
        assert proxy.message.args == (2,)
        first.ack(proxy)
        first.flush_acks()
        assert prepared_claims(first) == 0  # a new connection, claiming unprepared
        # The other consumer claims unprepared on the connection it has: a prepared
        # claim there would fail and reconnect.
        pid = backend(second)
        broker.enqueue(message(f"{queue}_b", 2))
        proxy = take(second)
        assert proxy.message.args == (2,)
        second.ack(proxy)
        second.flush_acks()
        assert backend(second) == pid
    assert rows("postgres", queue) == rows("postgres", f"{queue}_b") == 0
    warnings = [r.getMessage() for r in caplog.records if "prepared claim" in r.getMessage()]
    assert len(warnings) == 1 and '"listen": False' in warnings[0], warnings
    later = broker.consume(f"{queue}_c", prefetch=1, timeout=200)
    broker.enqueue(message(f"{queue}_c", 3))
    later.ack(take(later))
    assert prepared_claims(later) == 0
    for consumer in (first, second, later):
        consumer.close()


# psycopg forgets its prepared statements when it sees DEALLOCATE ALL go by, not when a
# function runs it: as when a pooler hands over another server connection.
DEALLOCATE_BEHIND_PSYCOPGS_BACK = "DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$"


CLAIM_AND_HANG = """
import sys, time, django
django.setup()
from djqueue.brokers.database import DatabaseBroker
broker = DatabaseBroker.from_url(sys.argv[1], lease=int(sys.argv[3]))
proxy = next(broker.consume(sys.argv[2], prefetch=1, timeout=10_000))
print(proxy and proxy.message_id, flush=True)
time.sleep(120)
"""


def test_a_killed_consumers_lease_expires_and_the_message_comes_back(make, alias, queue):
    broker = make()
    sent = broker.enqueue(message(queue))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HANG, f"db://{alias}", queue, "1500"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        assert select.select([child.stdout], [], [], 30)[0], "the child claimed nothing in 30 s"
        assert child.stdout.readline().decode().strip() == sent.message_id
        claimed = time.monotonic()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    consumer = broker.consume(queue, prefetch=1, timeout=0)
    assert next(consumer) is None and broker.get_queue_stats(queue).in_flight == 1
    proxy = take(consumer)
    assert time.monotonic() - claimed > 1.0, "redelivered before the lease ran out"
    assert (proxy.message_id, proxy.delivery_count) == (sent.message_id, 2)
    consumer.ack(proxy)
    consumer.close()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_notify_wakes_an_idle_postgres_consumer_at_once(make, queue):
    # Polling once a minute: only NOTIFY can bring the message within the bound.
    producer, broker = make(), make(poll_interval=60_000)
    # Its first look finds nothing, and with nothing delayed it would look again in 10 s.
    consumer = broker.consume(queue, prefetch=1, timeout=5000)

    def receive(received: list[float], waiting: threading.Event) -> None:
        waiting.set()
        proxy = next(consumer)
        received.append(time.monotonic())
        consumer.ack(proxy)

    for n in range(3):
        received: list[float] = []
        waiting = threading.Event()
        thread = threading.Thread(target=receive, args=(received, waiting))
        thread.start()
        waiting.wait(5)
        time.sleep(0.1)  # let it settle into waiting: the point is an idle consumer
        sent = time.monotonic()
        producer.enqueue(message(queue, n))
        thread.join(10)
        assert received and received[0] - sent < 0.5, f"sent at {sent}, received at {received}"
    consumer.close()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_consumer_survives_its_connections_being_cut(make, alias, queue):
    broker = make()
    broker.enqueue(message(queue, 1))
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    held = take(consumer)
    with connections[alias].cursor() as cursor:  # the consumer's and the LISTEN connection
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    make().enqueue(message(queue, 2))
    assert take(consumer).message.args == (2,)  # next() never raised
    consumer.ack(held)
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 1)
    consumer.close()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_send_on_a_connection_that_broke_meanwhile_reconnects(make, alias, queue):
    broker = make()
    connection = connections[alias]
    connection.ensure_connection()
    # As after a server restart: this thread's idle connection is dead, and Django does
    # not know it yet.
    terminate(alias, connection.connection.info.backend_pid)
    broker.enqueue(message(queue, 1))
    assert rows(alias, queue) == 1
    # In a transaction the send is part of it, and the transaction is gone with the
    # connection: sending on a new connection would store the message on its own.
    with pytest.raises(errors.ConnectionError), transaction.atomic(using=alias):
        terminate(alias, connection.connection.info.backend_pid)
        broker.enqueue(message(queue, 2))
    transaction.set_autocommit(False, using=alias)
    try:
        terminate(alias, connection.connection.info.backend_pid)
        with pytest.raises(errors.ConnectionError):
            broker.enqueue(message(queue, 3))
    finally:
        connection.close()
        transaction.set_autocommit(True, using=alias)
    assert rows(alias, queue) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_batch_on_a_connection_that_broke_meanwhile_is_sent_again_whole(make, alias, queue):
    # More rows than one statement takes: the broker writes them in a transaction of its
    # own, whose failed rollback makes Django close the lost connection and open another
    # before the broker sees the error.
    broker = make()
    connection = connections[alias]
    connection.ensure_connection()
    statements: list[str] = []
    batch = [message(queue, n) for n in range(broker.sql.max_params // 6 + 1)]  # 6 parameters a row
    terminate(alias, connection.connection.info.backend_pid)
    with connection.execute_wrapper(
        lambda execute, sql, *args: statements.append(sql) or execute(sql, *args)
    ):
        broker.enqueue_many(batch)
    # The first, lost with its connection, then the batch's two again on a new one.
    assert sum("INSERT" in sql for sql in statements) == 3
    stored = QueuedMessage.objects.using(alias).filter(queue_name=queue).values_list("message_id", flat=True)
    assert sorted(stored) == sorted(m.message_id for m in batch)
    # In the caller's transaction the batch is part of it, and is gone with it.
    with pytest.raises(errors.ConnectionError), transaction.atomic(using=alias):
        terminate(alias, connection.connection.info.backend_pid)
        broker.enqueue_many([message(queue, n) for n in range(len(batch))])
    assert rows(alias, queue) == len(batch)


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_cancel_and_purge_on_a_connection_that_broke_meanwhile_reconnect(make, alias, queue):
    broker = make()
    first, second, third = (broker.enqueue(message(queue, n)) for n in range(3))
    queued = QueuedMessage.objects.using(alias).filter(queue_name=queue).values_list("message_id", flat=True)
    connection = connections[alias]
    terminate(alias, connection.connection.info.backend_pid)
    assert broker.cancel(first.message_id) is True
    # In a transaction, as for a send: the cancel would have been part of it.
    with pytest.raises(errors.ConnectionError), transaction.atomic(using=alias):
        terminate(alias, connection.connection.info.backend_pid)
        broker.cancel(second.message_id)
    assert sorted(queued.all()) == sorted([second.message_id, third.message_id])
    terminate(alias, connection.connection.info.backend_pid)
    broker.purge(queue)
    assert rows(alias, queue) == 0


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_cancel_whose_reply_was_lost_is_repeated_and_cannot_tell_it_removed_the_message(
    make, alias, queue, monkeypatch
):
    # The DELETE commits and its reply is lost with the connection: the repeat finds
    # nothing. The message is gone all the same, and the answer is the documented False.
    broker = make()
    sent = broker.enqueue(message(queue, 1))
    connection = connections[alias]
    relay = Relay(int(connection.settings_dict.get("PORT") or 5432))
    connection.close()
    with monkeypatch.context() as patch:
        patch.setitem(connection.settings_dict, "PORT", str(relay.port))
        try:
            connection.ensure_connection()  # the handshake's replies must not be the lost one
            relay.drop_reply.set()
            assert broker.cancel(sent.message_id) is False
            assert relay.dropped == 1
        finally:
            connection.close()
            relay.close()
    assert rows(alias, queue) == 0


@contextmanager
def locked_table(alias: str) -> Iterator[None]:
    """Hold an exclusive lock on the queue table, from a connection of another thread."""
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        try:
            with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
                cursor.execute(f"LOCK TABLE {QueuedMessage._meta.db_table} IN ACCESS EXCLUSIVE MODE")
                locked.set()
                release.wait(10)
        finally:
            connections[alias].close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        yield
    finally:
        release.set()
        holder.join(10)


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_send_that_failed_on_a_working_connection_is_not_repeated(make, alias, queue):
    broker = make()
    try:
        with locked_table(alias):
            with connections[alias].cursor() as cursor:
                cursor.execute("SET statement_timeout = 300")
            # Raised after one timeout: not sent again (on a new connection, without the
            # timeout, it would wait for the lock).
            with pytest.raises(errors.ConnectionError, match="statement timeout"):
                broker.enqueue(message(queue, 1))
    finally:
        connections[alias].close()
    assert rows(alias, queue) == 0


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_send_that_failed_after_a_health_check_replaced_its_connection_is_not_repeated(
    make, alias, queue, monkeypatch
):
    # With CONN_HEALTH_CHECKS, the first cursor after a request's start replaces a lost
    # connection by itself. The send then fails on the new, working one: that error must
    # not pass for a lost connection because the one before was.
    broker = make()
    connection = connections[alias]
    options = {**connection.settings_dict["OPTIONS"], "options": "-c statement_timeout=300"}
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)
    monkeypatch.setitem(connection.settings_dict, "CONN_HEALTH_CHECKS", True)
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    inserts: list[str] = []

    def count(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        inserts.extend([sql] if "INSERT" in sql else [])
        return execute(sql, *args)

    try:
        connection.close()
        connection.ensure_connection()
        connection.close_if_unusable_or_obsolete()  # as at a request's start
        terminate(alias, connection.connection.info.backend_pid)
        with (
            locked_table(alias),
            connection.execute_wrapper(count),
            pytest.raises(errors.ConnectionError, match="statement timeout"),
        ):
            broker.enqueue(message(queue, 1))
    finally:
        connection.close()
    assert len(inserts) == 1
    assert rows(alias, queue) == 0


def terminate(alias: str, pid: int) -> None:
    """End PostgreSQL backend ``pid``, from a connection of another thread, and wait
    until it is gone."""

    def run() -> None:
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
                assert cursor.fetchone()[0], f"no backend {pid} to end"

                def gone() -> bool:
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
                    return cursor.fetchone()[0] == 0

                wait_for(gone, timeout=10, message=f"backend {pid} to end")
            done.append(pid)
        finally:
            connections[alias].close()

    done: list[int] = []
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(20)
    assert done == [pid], f"backend {pid} was not ended"


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_job_whose_connection_broke_is_retried_not_dead_lettered(make, alias, queue):
    broker = make()
    runs: list[int] = []

    @actor(broker=broker, actor_name="loses_its_connection", queue_name=queue, min_backoff=10, max_backoff=10)
    def loses_its_connection() -> None:
        runs.append(get_current_message().retries)
        if len(runs) == 1:
            # As when the server restarts during the job: the job's connection is cut.
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    loses_its_connection.send()
    worker = Worker(broker, queues=[queue], worker_threads=1)
    worker.start()
    try:
        wait_for(lambda: len(runs) == 2 and rows(alias, queue) == 0, message="the retry to run")
    finally:
        worker.stop(5_000)
    assert runs == [0, 1]
    assert broker.get_queue_stats(queue).dead == 0


@contextmanager
def stopped_backend(pid: int) -> Iterator[None]:
    """SIGSTOP the PostgreSQL server process ``pid`` (skip if it does not run here), and
    SIGCONT it after, or after 20 s whatever happens: a process left stopped would hold
    up the server."""
    with connections["postgres"].cursor() as cursor:
        cursor.execute("SELECT client_port FROM pg_stat_activity WHERE pid = %s", [pid])
        found = cursor.fetchone()
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        command = b""
    # Its command line names its client's port: the same pid in a container is not it.
    if found is None or not command.startswith(b"postgres") or f"({found[0]})".encode() not in command:
        pytest.skip("PostgreSQL does not run on this machine: its server process cannot be stopped")
    safety = threading.Timer(20, os.kill, (pid, signal.SIGCONT))
    safety.start()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        safety.cancel()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_listen_connection_whose_server_stops_answering_is_replaced(make, queue, monkeypatch):
    # The LISTEN connection's server process is stopped, not killed: the connection
    # stays open and silent, as when a server hangs or its host or network goes away
    # without closing it. Waiting on it for ever would leave the consumer finding new
    # messages only at its 10-second look.
    monkeypatch.setattr(database_threads, "LISTEN_CHECK", 0.3)
    monkeypatch.setattr(database_threads, "PROBE_TIMEOUT", 1.0)
    producer, broker = make(), make(poll_interval=60_000)
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    if broker._listener is None:
        pytest.skip("no LISTEN connection without psycopg 3")
    assert next(consumer) is None  # its first look: nothing, and no other for 10 s
    listening = wait_for(lambda: broker._listener.backend_pid, timeout=10, message="the LISTEN connection")
    with stopped_backend(listening):
        wait_for(
            lambda: broker._listener.backend_pid not in (None, listening),
            timeout=10,
            message="a new LISTEN connection",
        )
        sent = time.monotonic()
        producer.enqueue(message(queue, 1))
        proxy = take(consumer, timeout=5)
        assert time.monotonic() - sent < 2, "woken by the notification, not by the 10-second look"
    consumer.ack(proxy)
    consumer.close()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_claim_the_server_never_answers_is_cut_within_a_lease(make, queue):
    # The consumer's own server process is stopped between two claims: the next claim is
    # sent and never answered, as after a failover that left the old connection open.
    producer, broker = make(), make(lease=1500)
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    assert next(consumer) is None  # connected, idle
    claiming = consumer.db.wrapper.connection.info.backend_pid
    received: list[MessageProxy] = []
    thread = threading.Thread(target=lambda: received.append(take(consumer, timeout=10)), daemon=True)
    with stopped_backend(claiming):
        producer.enqueue(message(queue, 1))  # its notification makes the consumer claim
        thread.start()
        thread.join(8)
        assert received, "the consumer still waits for a server that does not answer"
    thread.join(10)
    assert received[0].message.args == (1,)
    assert consumer.db.wrapper.connection.info.backend_pid != claiming  # a new connection
    consumer.ack(received[0])
    consumer.close()
    assert rows("postgres", queue) == 0


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_heartbeat_the_server_never_answers_is_cut_and_the_lease_kept(make, queue):
    # The consumer holds a message and its server process is stopped: the next call on
    # its connection is the heartbeat, which must be cut and renewed on a new connection
    # before the lease (1.5 s) runs out, or another consumer would take the message.
    producer, broker = make(), make(lease=1500)
    producer.enqueue(message(queue, 1))
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    held = take(consumer)
    renewing = consumer.db.wrapper.connection.info.backend_pid

    def serving() -> int | None:
        wrapper = consumer.db.wrapper
        connection = wrapper.connection if wrapper is not None else None
        return None if connection is None or connection.closed else connection.info.backend_pid

    with stopped_backend(renewing):
        wait_for(lambda: serving() not in (None, renewing), timeout=5, message="a new connection")
    other = make().consume(queue, prefetch=1, timeout=100)
    deadline = time.monotonic() + 3  # two leases
    while time.monotonic() < deadline:
        taken = next(other)
        assert taken is None, "the held message's lease ran out: another consumer took it"
    consumer.ack(held)
    consumer.close()
    other.close()
    assert rows("postgres", queue) == 0


@pytest.mark.postgres
def test_a_consumer_gives_up_connecting_to_a_server_that_never_answers(monkeypatch):
    # A port that accepts connections and never says a word: without a connect timeout
    # the consumer's first call would wait for ever.
    monkeypatch.setattr(database_consumer, "CONNECT_TIMEOUT", 1)
    mute = socket.create_server(("127.0.0.1", 0))
    # Read when the consumer connects; Django's own connection to the alias is made already.
    monkeypatch.setitem(connections.settings["postgres"], "PORT", str(mute.getsockname()[1]))
    connection = database_consumer.Connection("postgres")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            connection.run(lambda cursor: None)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=call, daemon=True)
    try:
        thread.start()
        thread.join(8)
        assert errors, "still connecting to a server that never answers"
        assert isinstance(errors[0], OperationalError)
    finally:
        mute.close()
        connection.close()


@pytest.mark.parametrize("alias", ["default"])
def test_sqlite_consumer_sees_another_process_message_within_the_poll_interval(make, queue):
    producer, broker = make(), make(poll_interval=50)
    consumer = broker.consume(queue, prefetch=1, timeout=5000)
    sent = time.monotonic()
    producer.enqueue(message(queue))
    proxy = take(consumer)
    assert time.monotonic() - sent < 0.5
    consumer.ack(proxy)
    consumer.close()


@pytest.mark.postgres
@pytest.mark.parametrize("alias", ["postgres"])
def test_a_short_claim_is_one_statement_and_still_wakes_for_the_next_delayed_message(make, queue):
    # Nothing notifies when a delayed message comes due: the claim that came up short,
    # or the look that follows it, must learn when, or the consumer sleeps 10 s.
    broker = make()
    consumer = broker.consume(queue, prefetch=4, timeout=100)
    assert next(consumer) is None  # connected, and idle
    statements: list[str] = []
    wrapper = consumer.db.wrapper
    with wrapper.execute_wrapper(lambda execute, sql, *args: statements.append(sql) or execute(sql, *args)):
        broker.enqueue(message(queue, "now"))
        delayed = broker.enqueue(message(queue, "later"), delay=400)
        sent = time.monotonic()
        assert take(consumer).message.args == ("now",)
        assert len(statements) == 1, statements
        proxy = take(consumer, timeout=5)
    assert proxy.message_id == delayed.message_id
    assert 0.3 < time.monotonic() - sent < 2.0
    consumer.close()


@pytest.mark.parametrize("alias", ["default"])
def test_idle_sqlite_consumer_sees_a_commit_long_before_its_poll_interval(make, queue):
    # It reads SQLite's change counter five times per poll interval and looks at once
    # when another connection (here another "process") committed.
    producer, broker = make(), make(poll_interval=3000)
    consumer = broker.consume(queue, prefetch=1, timeout=200)
    assert next(consumer) is None  # it looked, found nothing, and is idle
    for n in range(3):
        time.sleep(0.05)
        sent = time.monotonic()
        producer.enqueue(message(queue, n))
        proxy = take(consumer)
        assert time.monotonic() - sent < 1.5, "waited for the full poll interval"
        consumer.ack(proxy)
    consumer.close()


@pytest.mark.parametrize("alias", ["default"])
def test_sqlite_claim_waits_out_another_writer(make, queue):
    broker = make()
    broker.enqueue(message(queue))
    blocker = sqlite3.connect(connections["default"].settings_dict["NAME"], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    consumer = broker.consume(queue, prefetch=1, timeout=5000)
    got: list[MessageProxy] = []
    thread = threading.Thread(target=lambda: got.append(next(consumer)))
    thread.start()
    thread.join(0.3)
    assert not got, "claimed while another connection held the write lock"
    blocker.execute("COMMIT")
    blocker.close()
    thread.join(10)
    assert got and got[0] is not None
    consumer.ack(got[0])
    consumer.close()


def test_workers_on_two_brokers_process_1000_messages_once(make, alias, queue):
    def register(broker: DatabaseBroker, done: list[int]) -> Any:
        # Each broker (a process of its own) has its own actor of the same name.
        @actor(broker=broker, actor_name="db_e2e", queue_name=queue)
        def job(n: int) -> None:
            assert get_current_message() is not None
            if n % 50 == 0:
                # A query on the worker thread's own connection, which DbConnections
                # closes after each message (CONN_MAX_AGE = 0), as after a request.
                QueuedMessage.objects.using(alias).filter(message_id="none").exists()
            done.append(n)

        return job

    done: list[list[int]] = [[], []]
    workers = []
    for index in range(2):
        broker = make()
        job = register(broker, done[index])
        workers.append(Worker(broker, queues=[queue], worker_threads=4, worker_timeout=200))
    for worker in workers:
        worker.start()
    try:
        workers[0].broker.enqueue_many([job.message(n) for n in range(1000)])
        wait_for(lambda: len(done[0]) + len(done[1]) >= 1000, timeout=60, message="1,000 messages")
        workers[0].join(timeout=10_000)
    finally:
        for worker in workers:
            worker.stop(5_000)
    assert sorted(done[0] + done[1]) == list(range(1000)), "a message was lost or ran twice"
    assert done[0] and done[1], "one worker did everything"
    assert rows(alias, queue) == 0


# -- configuration ---------------------------------------------------------------------------


def test_from_url_check_url_and_describe():
    broker = broker_from_url("db://postgres", lease=5000, poll_interval=20)
    assert isinstance(broker, DatabaseBroker) and broker.supports_transactions
    assert (broker.alias, broker.lease, broker.poll_interval) == ("postgres", 5000, 20)
    settings = connections["postgres"].settings_dict
    description = broker.describe()
    assert description.startswith("db://postgres (PostgreSQL database ")
    assert settings["NAME"] in description
    assert not settings["PASSWORD"] or settings["PASSWORD"] not in description
    assert DatabaseBroker.from_url("db://default").describe().startswith("db://default (SQLite ")
    for url, words in [
        ("db://", "settings.DATABASES"),
        ("db://nope", "'nope', which is not a key of settings.DATABASES"),
        ("db://default/extra", "db://ALIAS"),
        ("db://default?listen=false", "options go in DJQUEUE['BROKER_OPTIONS']"),
        ("db://default?password=s3cret", "'db://default?password=***' is not a database broker URL"),
    ]:
        with pytest.raises(ConfigurationError, match="DATABASES") as raised:
            DatabaseBroker.check_url(url)
        assert words in str(raised.value)
    with pytest.raises(ConfigurationError, match="lease"):
        DatabaseBroker.from_url("db://default", lease=0)
    (error,) = _check_url("db://nope")
    assert error.id == "djqueue.E002" and "DATABASES" in error.msg
    assert _check_url("db://default") == []
