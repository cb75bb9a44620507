"""Every broker refuses an option it does not take (DJQUEUE["BROKER_OPTIONS"]) with the
same message: the option, the nearest valid one, and the options it takes; and
``manage.py check`` reports it as djqueue.E005."""

from __future__ import annotations

import json

import pytest

from djqueue.brokers import broker_from_url
from djqueue.errors import ConfigurationError
from tests.process import run_django

BROKERS = [
    pytest.param(
        "amqp://guest:s3cret@127.0.0.1:5672/%2F", "RabbitMQ", "max_prority", "max_priority", id="rabbitmq"
    ),
    pytest.param("db://default", "database", "leese", "lease", id="database"),
    pytest.param("redis://:s3cret@127.0.0.1:6379/0", "Redis", "namespce", "namespace", id="redis"),
]


@pytest.mark.parametrize(("url", "name", "option", "nearest"), BROKERS)
def test_an_unknown_option_is_refused_naming_the_valid_ones(url, name, option, nearest):
    with pytest.raises(ConfigurationError) as raised:
        broker_from_url(url, middleware=[], **{option: 5})
    message = str(raised.value)
    assert message.startswith(f"unknown {name} broker option(s) {option} (did you mean {nearest}?): use ")
    valid = message.split(": use ", 1)[1]
    assert nearest in valid and "max_message_size" in valid
    assert "middleware" not in valid, "not an option: djqueue passes it"


def test_every_unknown_option_is_named_and_the_valid_ones_still_work():
    from djqueue.brokers.rabbitmq import RabbitmqBroker

    with pytest.raises(
        ConfigurationError, match=r"option\(s\) confirm_timout \(did you mean confirm_timeout\?\), zzz: "
    ):
        RabbitmqBroker(middleware=[], confirm_timout=5, zzz=1)
    broker = RabbitmqBroker(middleware=[], max_priority=3, max_message_size=1000)  # does not connect
    assert (broker.max_priority, broker.max_message_size) == (3, 1000)


@pytest.mark.parametrize(("url", "name", "option", "nearest"), BROKERS[:2])
def test_manage_py_check_reports_an_unknown_option(url, name, option, nearest):
    result = run_django("check", DJQUEUE_BROKER_URL=url, DJQUEUE_TEST_BROKER_OPTIONS=json.dumps({option: 5}))
    assert result.returncode != 0
    assert "djqueue.E005" in result.stderr
    assert f"unknown {name} broker option(s) {option} (did you mean {nearest}?)" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
