import time
import uuid

import pytest

from djqueue import actor, get_current_message
from djqueue.brokers import get_broker
from djqueue.models import DeadLetter
from djqueue.rate_limits import ConcurrentRateLimiter
from djqueue.testing import drain, stub_broker
from tests.testapp.tasks import record


@pytest.mark.django_db(transaction=True)
def test_stub_broker_moves_actors_and_drain_runs_them(record_dir):
    from tests.process import read_records

    original = get_broker()
    with stub_broker() as broker:
        assert get_broker() is broker and record.broker is broker
        message = record.send("hello")
        assert broker.get_queue_stats("default").ready == 1
        drain(broker, timeout=5_000)
        assert broker.get_queue_stats("default") == (0, 0, 0, 0)
    assert get_broker() is original and record.broker is original
    assert [(m, v) for m, _, v in read_records(record_dir)] == [(message.message_id, "hello")]


@pytest.mark.django_db(transaction=True)
def test_drain_runs_delayed_jobs_and_retries_at_once_on_the_stub_broker(record_dir):
    from tests.process import read_records

    with stub_broker() as broker:
        # The default backoffs (15 s, then 30 s) and an hour's delay: a test must not wait.
        @actor(broker=broker, actor_name="drain_fails_twice", max_retries=2)
        def fails() -> None:
            raise ValueError("no")

        failing = fails.send()
        later = record.send_with_options(args=("later",), delay=3_600_000)
        drain(broker, timeout=10_000)
        assert broker.get_queue_stats("default") == (0, 0, 0, 1)
        assert DeadLetter.objects.get(message_id=failing.message_id).retries == 2
        assert [(m, v) for m, _, v in read_records(record_dir)] == [(later.message_id, "later")]
        # Time runs again as usual once drain() returns.
        record.send_with_options(args=("much later",), delay=3_600_000)
        assert broker.get_queue_stats("default").delayed == 1
        with pytest.raises(TimeoutError):
            drain(broker, timeout=300, run_delayed=False)


@pytest.mark.django_db(transaction=True)
def test_drain_runs_a_rate_limited_retry_after_the_job_holding_the_limit():
    # Skipping ahead only when nothing else is due or running: the refused job's retry
    # comes once the holder has finished, not at once while it still holds the slot.
    limiter = ConcurrentRateLimiter(f"drain-{uuid.uuid4().hex}", limit=1, ttl=10_000)
    ran: list[tuple[str, int]] = []

    with stub_broker() as broker:

        @actor(broker=broker, actor_name="drain_limited", max_retries=3)
        def limited(name: str) -> None:
            with limiter.acquire():
                time.sleep(0.3)  # the job's own work, holding the slot
                ran.append((name, get_current_message().retries))

        limited.send("first")
        limited.send("second")
        drain(broker, timeout=10_000, threads=2)
        assert broker.get_queue_stats("default") == (0, 0, 0, 0)
    assert sorted(name for name, _ in ran) == ["first", "second"]
    assert max(retries for _, retries in ran) == 1, "the refused job ran once more, and then got the slot"
