import pytest

from djqueue.brokers import get_broker
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
