"""DeadLetters: every message that fails for good gets its row, whatever it holds."""

from __future__ import annotations

import sys

import pytest

from djqueue.brokers.base import MessageProxy
from djqueue.message import Message
from djqueue.middleware.dead_letters import DeadLetters
from djqueue.models import DeadLetter

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request, settings) -> str:
    """Where the rows go: each database refuses other things in a JSON column."""
    if request.param == "postgres":
        settings.DATABASE_ROUTERS = ["tests.routers.DeadLettersOnPostgres"]
        return "postgres"
    return "default"


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def dead_letter(broker, database, *args) -> DeadLetter:
    proxy = MessageProxy(Message(queue_name="default", actor_name="record", args=args, kwargs={}, options={}))
    proxy.fail("given up")
    DeadLetters().before_nack(broker, proxy)
    assert proxy.dead_lettered
    return DeadLetter.objects.using(database).get(message_id=proxy.message_id)


def test_arguments_nested_deeper_than_python_recurses_still_get_a_row(stub_broker, database):
    # json reads a payload nested nearly as deep as the recursion limit; a worker thread,
    # already some frames down, cannot walk it again, nor can the JSON column's encoder.
    row = dead_letter(stub_broker, database, nested(sys.getrecursionlimit() + 50))
    assert row.args == [] and row.message == {}
    # As text if json can still write it (Python 3.12's has a deeper limit of its own).
    assert row.raw_payload == "(the message is nested too deeply to show)" or row.raw_payload.startswith(
        '{"queue_name": "default", "actor_name": "record", "args": [[[[['
    )
    assert "kept as its raw payload: the message is nested too deeply" in row.exception_message
    assert "given up" in row.exception_message


def test_a_row_for_nan_names_where_it_was(stub_broker, database):
    row = dead_letter(stub_broker, database, {"ratio": [1.0, float("nan")]})
    assert row.args == [] and '"ratio": [1.0, NaN]' in row.raw_payload
    assert "holds nan at args[0]['ratio'][1]" in row.exception_message


def test_a_lone_surrogate_is_kept_as_its_escape(stub_broker, database):
    # PostgreSQL's jsonb refuses one, and no driver encodes one in a text column.
    row = dead_letter(stub_broker, database, "a\udbffb")
    assert row.args == [] and '["a\\udbffb"]' in row.raw_payload
    assert "holds a lone surrogate at args[0]" in row.exception_message


def test_what_a_json_column_holds_is_kept_as_it_is(stub_broker, database):
    row = dead_letter(stub_broker, database, {"ratio": 0.5, "name": "Zoë \U0001f600"}, [None, True])
    assert row.args == [{"ratio": 0.5, "name": "Zoë \U0001f600"}, [None, True]] and row.raw_payload == ""
