"""The JSON encoder takes and writes the same things with and without orjson installed,
so that what a project may send does not depend on what is installed where."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid

import pytest

from djqueue import encoder
from djqueue.encoder import JSONEncoder
from djqueue.message import Message
from djqueue.testing import stub_broker
from tests.testapp.tasks import record

orjson = pytest.importorskip("orjson")  # requirements/test.txt: both ways are tested


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Point:
    x: int


ACCEPTED = [
    ("text", '"text"'),
    ("\ud800", '"\\ud800"'),  # a lone surrogate: json escapes it, orjson refuses it
    (2**64 - 1, "18446744073709551615"),
    (-(2**63), "-9223372036854775808"),
    (1.5, "1.5"),
    (None, "null"),
    (True, "true"),
    ((1, [2, {"k": None}]), '[1,[2,{"k":null}]]'),
    (uuid.UUID(int=7), '"00000000-0000-0000-0000-000000000007"'),
    (Colour.RED, '"red"'),
    (Level.HIGH, "3"),
]

REFUSED = [
    (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "args[0] is a datetime.datetime"),
    (dt.date(2026, 1, 1), "args[0] is a datetime.date"),
    (dt.timedelta(seconds=1), "args[0] is a datetime.timedelta"),
    (decimal.Decimal("1.5"), "args[0] is a decimal.Decimal"),
    (Point(1), "args[0] is a tests.core.test_encoder.Point"),
    ({"a"}, "args[0] is a builtins.set"),
    ({1: "a"}, "args[0] has the key 1"),
    ([{"ok": 1}, {"deep": float("nan")}], "args[0][1]['deep'] is nan"),
    (float("-inf"), "args[0] is -inf"),
    (2**64, "args[0] is an integer beyond 64 bits"),
]


@pytest.fixture(params=["orjson", "json"])
def installed(request, monkeypatch):
    if request.param == "json":
        monkeypatch.setattr(encoder, "orjson", None)
    return request.param


def message(*args: object, **kwargs: object) -> dict:
    return Message(
        queue_name="q", actor_name="a", args=args, kwargs=kwargs, options={}, message_id="m"
    ).asdict()


@pytest.mark.parametrize(("value", "written"), ACCEPTED, ids=[repr(v) for v, _ in ACCEPTED])
def test_the_same_values_are_written_alike_with_and_without_orjson(installed, value, written):
    encoded = JSONEncoder().encode(message(value))
    assert f'"args":[{written}]'.encode() in encoded
    # Read back by a worker either way: one with orjson, one without.
    assert JSONEncoder().decode(encoded)["args"] == encoder.json.loads(f"[{written}]")


@pytest.mark.parametrize(("value", "named"), REFUSED, ids=[repr(v) for v, _ in REFUSED])
def test_the_same_values_are_refused_with_and_without_orjson(installed, value, named):
    with pytest.raises(TypeError, match=r"^message is not JSON serializable: ") as raised:
        JSONEncoder().encode(message(value))
    assert named in str(raised.value)


def test_what_either_one_wrote_the_other_reads(monkeypatch):
    values = message("\ud800", {"k": [1, 2.5, None]}, 2**64 - 1, when="2026-01-01")
    with_orjson = JSONEncoder().encode(values)
    monkeypatch.setattr(encoder, "orjson", None)
    without = JSONEncoder().encode(values)
    assert JSONEncoder().decode(with_orjson) == JSONEncoder().decode(without)
    monkeypatch.undo()
    assert JSONEncoder().decode(with_orjson) == JSONEncoder().decode(without)
    # The largest integer either reads back exactly: orjson reads a larger one as a float.
    assert JSONEncoder().decode(without)["args"][2] == 2**64 - 1


def test_a_send_with_a_datetime_argument_fails_naming_it(installed):
    with stub_broker() as broker:
        with pytest.raises(TypeError, match=r"args\[0\] is a datetime\.datetime.*isoformat"):
            record.send(dt.datetime(2026, 1, 1))
        assert broker.get_queue_stats("default").ready == 0
