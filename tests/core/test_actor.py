from __future__ import annotations

import datetime as dt
import logging

import pytest

from djqueue import ConfigurationError, Message, ResultTimeout, actor
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


def _plain_function() -> None: ...


# (option, a value refused at import, a value of the same option still accepted)
BAD_AND_GOOD_VALUES = [
    ("max_retries", None, 0),
    ("max_retries", -1, 3),
    ("max_retries", "3", 3),
    ("max_retries", True, 1),
    ("min_backoff", -1, 0),
    ("max_backoff", 1.5, 1_000),
    ("retry_when", True, lambda retries, exception: retries < 3),
    ("throws", "ValueError", ValueError),
    ("throws", [ValueError, "KeyError"], [ValueError, KeyError]),
    ("throws", ValueError(), (ValueError, KeyError)),
    ("time_limit", -1, 0),
    ("time_limit", "60s", 60_000),
    ("time_limit", float("inf"), 1.5e6),
    ("max_age", -5, 0),
    ("store_results", "yes", True),
    ("result_ttl", 0, 60_000),
    ("on_success", _plain_function, "shop.tasks.report_done"),
    ("on_failure", "", None),
    ("max_deliveries", 0, 1),
    ("notify_shutdown", "true", True),
]


@pytest.mark.parametrize(("option", "bad", "good"), BAD_AND_GOOD_VALUES)
def test_a_bad_option_value_is_rejected_at_import(stub_broker, option, bad, good):
    with pytest.raises(
        ConfigurationError, match=rf"^@actor bad_value: {option}=.* is not valid: {option} must be"
    ):

        @actor(broker=stub_broker, actor_name="bad_value", **{option: bad})
        def bad_value() -> None: ...

    assert "bad_value" not in stub_broker.actors

    @actor(broker=stub_broker, actor_name="good_value", **{option: good})
    def good_value() -> None: ...

    assert good_value.options == {option: good}


def test_bad_option_messages_say_how_to_fix(stub_broker):
    with pytest.raises(
        ConfigurationError, match=r"max_retries=None .*retry_when=lambda retries, exception: True"
    ):

        @actor(broker=stub_broker, max_retries=None)
        def forever() -> None: ...

    with pytest.raises(
        ConfigurationError, match=r"throws='ValueError' .*pass the class itself: throws=ValueError"
    ):

        @actor(broker=stub_broker, throws="ValueError")
        def named() -> None: ...

    with pytest.raises(
        ConfigurationError, match=r"on_success=<function _plain_function.*decorate the function with @actor"
    ):

        @actor(broker=stub_broker, on_success=_plain_function)
        def undecorated() -> None: ...


def test_min_backoff_over_max_backoff_is_rejected(stub_broker):
    with pytest.raises(
        ConfigurationError, match=r"^@actor backoff: min_backoff=60000 is more than max_backoff=1000"
    ):

        @actor(broker=stub_broker, actor_name="backoff", min_backoff=60_000, max_backoff=1_000)
        def backoff() -> None: ...

    # Equal is fine, and max_backoff alone under the default min_backoff is a plain cap.
    @actor(broker=stub_broker, actor_name="constant", min_backoff=1_000, max_backoff=1_000)
    def constant() -> None: ...

    @actor(broker=stub_broker, actor_name="capped", max_backoff=5_000)
    def capped() -> None: ...


def test_a_time_limit_that_looks_like_seconds_is_logged(stub_broker, caplog):
    with caplog.at_level(logging.WARNING, logger="djqueue.time_limit"):

        @actor(broker=stub_broker, actor_name="seconds", time_limit=60)
        def seconds() -> None: ...

        # Accepted (tests use short limits on purpose), and said once, not at every send.
        assert seconds.options == {"time_limit": 60}
        seconds.send_with_options(time_limit=60)

        @actor(broker=stub_broker, actor_name="minute", time_limit=60_000)
        def minute() -> None: ...

        @actor(broker=stub_broker, actor_name="unlimited", time_limit=0)
        def unlimited() -> None: ...

    (logged,) = [r.getMessage() for r in caplog.records if r.name == "djqueue.time_limit"]
    assert logged == (
        "actor seconds: time_limit=60 is in milliseconds: the actor is stopped after 60 ms; "
        "for 60 seconds write time_limit=60_000"
    )


def test_send_with_options_checks_the_values_it_overrides(stub_broker):
    @actor(broker=stub_broker, actor_name="overridden", max_backoff=60_000)
    def overridden() -> None: ...

    for options, match in [
        ({"max_retries": -1}, "max_retries=-1"),
        ({"time_limit": "10s"}, "time_limit='10s'"),
        ({"store_results": "no"}, "store_results='no'"),
        # Checked against the actor's own max_backoff, as a worker would combine them.
        ({"min_backoff": 120_000}, "min_backoff=120000 is more than max_backoff=60000"),
    ]:
        with pytest.raises(ConfigurationError, match=rf"^message options for actor overridden: {match}"):
            overridden.send_with_options(**options)
    assert stub_broker.get_queue_stats("default").ready == 0
    # None is "the actor's value", as a worker reads it; valid overrides pass.
    assert overridden.send_with_options(max_retries=None, time_limit=None) is not None
    assert overridden.send_with_options(max_retries=0, min_backoff=1_000, time_limit=0) is not None


def test_options_read_from_the_actor_alone_are_refused_per_message(stub_broker):
    # The worker never reads these from a message: sending one would silently not apply.
    @actor(broker=stub_broker, actor_name="fixed", throws=KeyError)
    def fixed() -> None: ...

    for options, names in [
        ({"throws": ValueError}, "throws"),
        ({"retry_when": lambda retries, exception: True, "throws": (ValueError,)}, "retry_when, throws"),
        ({"notify_shutdown": True}, "notify_shutdown"),
    ]:
        first = names.split(",")[0]
        refused = rf"^{names} cannot be given per message for actor fixed: .*\(@actor\({first}=\.\.\.\)\)"
        with pytest.raises(ConfigurationError, match=refused):
            fixed.send_with_options(**options)
    assert stub_broker.get_queue_stats("default").ready == 0
    assert fixed.send_with_options(throws=None, notify_shutdown=None) is not None  # the actor's


def test_a_positional_actor_name_is_a_clear_type_error(stub_broker):
    with pytest.raises(TypeError, match=r"to name the actor write @actor\(actor_name='shop.send'\)"):

        @actor("shop.send")
        def send() -> None: ...


def test_celery_habits_get_a_hint(stub_broker):
    @actor(broker=stub_broker, actor_name="hinted")
    def hinted() -> None: ...

    with pytest.raises(
        ConfigurationError, match=r"unknown message option\(s\) countdown .*use delay= in milliseconds"
    ):
        hinted.send_with_options(countdown=10)
    with pytest.raises(ConfigurationError, match=r"expires: use max_age="):
        hinted.send_with_options(expires=60)
    with pytest.raises(
        ConfigurationError, match=r"eta= must be an aware datetime .*not 1700000000: .*delay="
    ):
        hinted.send_with_options(eta=1_700_000_000)
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) name; name: use actor_name="):

        @actor(broker=stub_broker, name="shop.named")
        def named() -> None: ...

    assert stub_broker.get_queue_stats("default").ready == 0


@pytest.mark.django_db(transaction=True)
def test_a_result_timeout_says_when_the_actor_stores_no_result(stub_broker):
    @actor(broker=stub_broker, actor_name="no_results")
    def no_results() -> None: ...

    @actor(broker=stub_broker, actor_name="with_results", store_results=True)
    def with_results() -> None: ...

    with pytest.raises(ResultTimeout, match=r"its actor no_results does not have store_results=True"):
        no_results.send().get_result(block=True, timeout=50)
    # The message asks for its result: the actor's option does not matter.
    message = no_results.send_with_options(store_results=True)
    with pytest.raises(ResultTimeout, match=r"it has not finished: is a worker consuming queue 'default'"):
        message.get_result(block=True, timeout=50)
    with pytest.raises(ResultTimeout, match=r"it has not finished: is a worker consuming queue 'default'"):
        with_results.send().get_result(block=True, timeout=50)
    # An actor this process does not know (or a bare id): both causes are named.
    unknown = Message(queue_name="default", actor_name="elsewhere.job", args=(), kwargs={}, options={})
    with pytest.raises(ResultTimeout, match=r"or its actor does not have store_results=True"):
        unknown.get_result(block=True, timeout=50)
