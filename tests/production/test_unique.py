"""Unique jobs: a second message with the same unique_key is not enqueued while the first
is queued, delayed or running; the key is freed on ack, dead-lettering, cancel or TTL."""

from __future__ import annotations

import threading
import uuid

import pytest
from django.test import override_settings

from djqueue import actor, group
from djqueue.brokers import cancel
from djqueue.brokers.redis import RedisBroker
from djqueue.errors import ConfigurationError, ConnectionError, MessageTooLarge
from djqueue.message import Message
from djqueue.middleware.unique import DuplicateJob
from djqueue.models import DeadLetter
from djqueue.rate_limits import set_backend
from tests.process import wait_for

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


def ukey() -> str:
    return f"report-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def job(stub_broker):
    runs: list[int] = []

    @actor(broker=stub_broker, actor_name="unique_job")
    def unique_job(n: int) -> None:
        runs.append(n)

    unique_job.runs = runs
    return unique_job


def test_a_duplicate_is_not_enqueued_until_the_first_is_acked(stub_broker, stub_worker, any_backend, job):
    key = ukey()
    first = job.send_with_options(args=(1,), unique_key=key)
    assert first is not None
    assert job.send_with_options(args=(2,), unique_key=key) is None
    assert job.send_with_options(args=(3,), unique_key=ukey()) is not None, "another key is independent"
    assert job.send_with_options(args=(4,)) is not None, "messages without a key are not affected"
    assert stub_broker.get_queue_stats("default").ready == 3
    stub_worker.start()
    stub_worker.join(timeout=10_000)
    assert sorted(job.runs) == [1, 3, 4]
    wait_for(lambda: any_backend.unique_holder("unique:" + key) is None, timeout=5, message="key freed")
    assert job.send_with_options(args=(5,), unique_key=key) is not None


def test_the_key_is_held_while_the_message_runs(stub_broker, stub_worker, memory_backend):
    started, finish = threading.Event(), threading.Event()

    @actor(broker=stub_broker, actor_name="unique_blocking")
    def blocking() -> None:
        started.set()
        finish.wait(10)

    key = ukey()
    running = blocking.send_with_options(unique_key=key)
    stub_worker.start()
    assert started.wait(10)
    assert blocking.send_with_options(unique_key=key) is None
    finish.set()
    stub_worker.join(timeout=10_000)
    assert memory_backend.unique_holder("unique:" + key) is None
    again = blocking.send_with_options(unique_key=key)
    assert again is not None and again.message_id != running.message_id


def test_retries_keep_the_key_and_dead_lettering_frees_it(stub_broker, stub_worker, memory_backend):
    attempts: list[int] = []
    release = threading.Event()

    @actor(broker=stub_broker, actor_name="unique_failing", max_retries=2, min_backoff=300, max_backoff=300)
    def failing() -> None:
        attempts.append(1)
        if len(attempts) == 3:
            release.wait(10)
        raise RuntimeError("fails on purpose")

    key = ukey()
    message = failing.send_with_options(unique_key=key)
    stub_worker.start()
    wait_for(lambda: len(attempts) >= 1 and stub_broker.get_queue_stats("default").delayed == 1)
    assert failing.send_with_options(unique_key=key) is None, "refused while a retry waits"
    wait_for(lambda: len(attempts) == 3, timeout=10, message="the last attempt")
    assert memory_backend.unique_holder("unique:" + key) == message.message_id
    release.set()
    stub_worker.join(timeout=10_000)
    assert DeadLetter.objects.filter(message_id=message.message_id).exists()
    assert memory_backend.unique_holder("unique:" + key) is None
    assert failing.send_with_options(unique_key=key) is not None


def test_the_key_expires_after_its_ttl(stub_broker, job, memory_backend):
    key = ukey()
    assert job.send_with_options(args=(1,), unique_key=key, unique_ttl=200) is not None
    assert job.send_with_options(args=(2,), unique_key=key) is None
    second = wait_for(
        lambda: job.send_with_options(args=(3,), unique_key=key), timeout=5, message="the TTL to end"
    )
    assert second.args == (3,)
    assert stub_broker.get_queue_stats("default").ready == 2


def test_a_delayed_message_holds_its_key_past_the_default_ttl(stub_broker, job, memory_backend):
    from djqueue.middleware.unique import UniqueJobs

    unique = stub_broker.get_middleware(UniqueJobs)
    unique.default_ttl = 100
    key = ukey()
    delayed = job.send_with_options(args=(1,), unique_key=key, delay=60_000)
    assert delayed is not None
    assert memory_backend._unique["unique:" + key][1] >= delayed.eta + 100


def test_cancel_frees_the_key(stub_broker, job, memory_backend):
    key = ukey()
    message = job.send_with_options(args=(1,), unique_key=key, delay=60_000)
    assert job.send_with_options(args=(2,), unique_key=key) is None
    assert cancel(message.message_id) is True
    assert cancel(message.message_id) is False
    assert stub_broker.get_queue_stats("default")[:2] == (0, 0)
    assert job.send_with_options(args=(3,), unique_key=key) is not None


def test_a_failed_enqueue_frees_the_key(stub_broker, job, memory_backend):
    key = ukey()
    stub_broker.max_message_size = 200
    with pytest.raises(MessageTooLarge):
        job.send_with_options(args=("x" * 500,), unique_key=key)
    assert memory_backend.unique_holder("unique:" + key) is None
    stub_broker.max_message_size = 1024 * 1024
    assert job.send_with_options(args=(1,), unique_key=key) is not None


def test_a_group_that_cannot_be_sent_frees_the_keys_its_members_claimed(stub_broker, job, memory_backend):
    keys = [ukey() for _ in range(3)]
    stub_broker.max_message_size = 300
    members = [job.message_with_options(args=(n,), unique_key=key) for n, key in enumerate(keys[:2])]
    members.append(job.message_with_options(args=("x" * 500,), unique_key=keys[2]))
    with pytest.raises(MessageTooLarge):
        group(members, broker=stub_broker).run()
    assert stub_broker.get_queue_stats("default").ready == 0
    assert [memory_backend.unique_holder("unique:" + key) for key in keys] == [None, None, None]
    stub_broker.max_message_size = 1024 * 1024
    assert all(job.send_with_options(args=(1,), unique_key=key) is not None for key in keys)


@pytest.mark.parametrize("delay", [None, 60_000])
def test_a_group_with_a_held_key_enqueues_no_member_and_frees_their_keys(
    stub_broker, job, memory_backend, delay
):
    free, held = ukey(), ukey()
    holder = job.send_with_options(args=(0,), unique_key=held)
    members = [
        job.message_with_options(args=(1,), unique_key=free),
        job.message_with_options(args=(2,), unique_key=held),
    ]
    with pytest.raises(DuplicateJob):
        group(members, broker=stub_broker).run(delay=delay)
    stats = stub_broker.get_queue_stats("default")
    assert (stats.ready, stats.delayed) == (1, 0)  # the holder alone
    assert memory_backend.unique_holder("unique:" + free) is None
    assert memory_backend.unique_holder("unique:" + held) == holder.message_id, "the holder keeps its key"


def test_a_batch_the_broker_cannot_store_frees_its_keys(memory_backend):
    broker = RedisBroker(url="redis://127.0.0.1:1/0")  # nothing listens there
    keys = [ukey() for _ in range(3)]
    messages = [
        Message(
            queue_name="default", actor_name="unique_job", args=(n,), kwargs={}, options={"unique_key": key}
        )
        for n, key in enumerate(keys)
    ]
    with pytest.raises(ConnectionError):
        broker.enqueue_many(messages)
    assert [memory_backend.unique_holder("unique:" + key) for key in keys] == [None, None, None]


def test_enqueue_on_commit_refuses_a_duplicate_at_call_time(stub_broker, job, memory_backend):
    from django.db import transaction

    key = ukey()
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", "ENQUEUE_ON_COMMIT": True}):
        set_backend(memory_backend)  # changing DJQUEUE resets the process-wide store
        with transaction.atomic():
            first = job.send_with_options(args=(1,), unique_key=key)
            assert first is not None
            assert memory_backend.unique_holder("unique:" + key) is None, "claimed only at commit"
        assert memory_backend.unique_holder("unique:" + key) == first.message_id
        with transaction.atomic():
            assert job.send_with_options(args=(2,), unique_key=key) is None
    assert stub_broker.get_queue_stats("default").ready == 1


@pytest.mark.parametrize(
    ("options", "error"),
    [({"unique_key": ""}, "unique_key must be"), ({"unique_key": "k", "unique_ttl": 0}, "unique_ttl must")],
)
def test_bad_unique_options(stub_broker, job, memory_backend, options, error):
    with pytest.raises(ConfigurationError, match=error):
        job.send_with_options(args=(1,), **options)
