from __future__ import annotations

import datetime as dt

import pytest

from djqueue import ConfigurationError, Message, actor
from djqueue.message import current_millis


def test_actor_runs_inline_and_sends_a_message(stub_broker):
    @actor(broker=stub_broker)
    def add(x: int, y: int) -> int:
        return x + y

    assert add(1, 2) == 3
    message = add.send(1, y=2)
    assert isinstance(message, Message)
    assert message.actor_name == f"{__name__}.test_actor_runs_inline_and_sends_a_message.<locals>.add"
    assert message.queue_name == "default"
    assert message.args == (1,) and message.kwargs == {"y": 2}
    assert len(message.message_id) == 36
    assert abs(message.message_timestamp - current_millis()) < 5_000
    assert stub_broker.get_queue_stats("default").ready == 1


def test_unknown_actor_option_is_rejected(stub_broker):
    with pytest.raises(ConfigurationError, match=r"unknown option.*max_retires"):

        @actor(broker=stub_broker, max_retires=3)
        def typo() -> None: ...


def test_invalid_queue_name_is_rejected(stub_broker):
    with pytest.raises(ConfigurationError, match="invalid queue name"):

        @actor(broker=stub_broker, queue_name="no spaces allowed")
        def bad_queue() -> None: ...


def test_duplicate_actor_name_is_rejected(stub_broker):
    @actor(broker=stub_broker, actor_name="dup")
    def first() -> None: ...

    with pytest.raises(ConfigurationError, match="already registered"):

        @actor(broker=stub_broker, actor_name="dup")
        def second() -> None: ...


def test_send_with_delay_and_eta(stub_broker):
    @actor(broker=stub_broker, actor_name="later")
    def later() -> None: ...

    delayed = later.send_with_options(delay=60_000)
    assert delayed.eta is not None and delayed.eta - current_millis() > 55_000
    eta = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    at_eta = later.send_with_options(eta=eta)
    assert abs(at_eta.eta - int(eta.timestamp() * 1000)) < 1_000
    assert stub_broker.get_queue_stats("default").delayed == 2
    with pytest.raises(ConfigurationError, match="aware"):
        later.send_with_options(eta=dt.datetime.now())
    with pytest.raises(ConfigurationError, match="not both"):
        later.send_with_options(delay=1, eta=eta)
    with pytest.raises(ConfigurationError, match="milliseconds"):
        later.send_with_options(delay=-5)


def test_priority_option_and_override(stub_broker):
    @actor(broker=stub_broker, actor_name="prio", priority=5)
    def prio() -> None: ...

    assert prio.send().priority == 5
    assert prio.send_with_options(priority=9).priority == 9
    with pytest.raises(ConfigurationError, match="unknown message option"):
        prio.send_with_options(bogus=1)


def test_message_roundtrip_and_validation():
    message = Message(
        queue_name="q", actor_name="a", args=(1, "x"), kwargs={"k": [1]}, options={"priority": 2}
    )
    decoded = Message.decode(message.encode())
    assert decoded == message
    from djqueue import DecodeError

    with pytest.raises(DecodeError, match="not valid JSON"):
        Message.decode(b"\xff\x00garbage")
    with pytest.raises(DecodeError, match="missing the field"):
        Message.decode(b'{"queue_name": "q"}')
    with pytest.raises(DecodeError, match="'args' must be list"):
        Message.decode(b'{"queue_name": "q", "actor_name": "a", "message_id": "x", "args": 5}')
    with pytest.raises(DecodeError, match="not an object"):
        Message.decode(b"[1, 2]")


def test_send_on_commit_waits_for_the_commit(stub_broker, transactional_db):
    from django.db import transaction

    @actor(broker=stub_broker, actor_name="on_commit")
    def on_commit() -> None: ...

    with transaction.atomic():
        message = on_commit.send_on_commit()
        assert stub_broker.get_queue_stats("default").ready == 0
    assert message.message_id
    assert stub_broker.get_queue_stats("default").ready == 1


def test_oversized_message_is_refused_at_send(stub_broker):
    from djqueue import MessageTooLarge

    @actor(broker=stub_broker, actor_name="big")
    def big(data: str) -> None: ...

    stub_broker.max_message_size = 1000
    with pytest.raises(MessageTooLarge, match="over the maximum of 1000"):
        big.send("x" * 2000)
    assert stub_broker.get_queue_stats("default").ready == 0
