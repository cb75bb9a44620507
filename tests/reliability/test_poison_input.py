"""Scenario 4, poison input: arbitrary bytes, wrong JSON shapes, unknown actors, wrong
argument counts, junk option values and oversized payloads are pushed straight into each
broker's queue (``broker.enqueue_raw``) between good messages. The worker process never
dies, the good messages all run, and every bad one becomes a DeadLetter row with a
readable reason. Oversized arguments are refused at ``.send()``."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from djqueue import actor
from djqueue.errors import MessageTooLarge
from djqueue.models import DeadLetter
from tests.process import wait_for
from tests.reliability.conftest import executions
from tests.testapp.tasks import always_fail, record

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
]

MAX_SIZE = 64 * 1024  # a small DJQUEUE["MAX_MESSAGE_SIZE"], so oversized payloads stay cheap
EXAMPLES = 50

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def message_dict(queue: str, actor_name: str = "record", args: Any = (), **fields: Any) -> dict[str, Any]:
    return {
        "queue_name": queue,
        "actor_name": actor_name,
        "args": list(args),
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1_700_000_000_000,
        **fields,
    }


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


class Poison(bytes):
    """A bad payload whose repr stays short in failure reports."""

    kind = ""

    def __repr__(self) -> str:
        text = bytes.__repr__(self)
        return f"<{self.kind} {len(self)} bytes: {text[:200]}{'...' if len(text) > 200 else ''}>"


@st.composite
def poison(draw: st.DrawFn, queue: str) -> Poison:
    kind, payload = draw(poison_parts(queue))
    value = Poison(payload)
    value.kind = kind
    return value


@st.composite
def poison_parts(draw: st.DrawFn, queue: str) -> tuple[str, bytes]:
    """(kind, payload) of one bad message."""
    kind = draw(
        st.sampled_from(
            [
                "bytes",
                "json",
                "field",
                "missing",
                "unknown_actor",
                "arguments",
                "options",
                "timestamp",
                "oversized",
            ]
        )
    )
    if kind == "bytes":
        return kind, draw(st.binary(max_size=300))
    if kind == "json":  # valid JSON that is no message at all
        return kind, encode(draw(json_values))
    good = message_dict(queue)
    if kind == "field":  # one field of the wrong type
        name = draw(st.sampled_from(["queue_name", "actor_name", "message_id", "args", "kwargs", "options"]))
        kinds = {
            "queue_name": str,
            "actor_name": str,
            "message_id": str,
            "args": list,
            "kwargs": dict,
            "options": dict,
        }
        good[name] = draw(json_values.filter(lambda v: not isinstance(v, kinds[name])))
        return kind, encode(good)
    if kind == "missing":
        del good[draw(st.sampled_from(["queue_name", "actor_name", "message_id"]))]
        if draw(st.booleans()):
            good[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in good))] = 1
        return kind, encode(good)
    if kind == "unknown_actor":
        good["actor_name"] = "no_such_actor_" + draw(st.text(max_size=10))
        return kind, encode(good)
    if kind == "arguments":  # record takes at most one argument
        if draw(st.booleans()):
            good["args"] = draw(st.lists(json_values, min_size=2, max_size=5))
        else:
            good["kwargs"] = {"no_such_parameter": draw(json_values)}
        return kind, encode(good)
    if kind == "options":  # a failing job whose options are junk must still end up dead
        name = draw(
            st.sampled_from(["retries", "max_retries", "priority", "eta", "min_backoff", "time_limit"])
        )
        good.update(
            actor_name=always_fail.actor_name,
            options={name: draw(st.text(max_size=10) | st.lists(st.none()))},
        )
        return kind, encode(good)
    if kind == "timestamp":  # an integer, but no time at all
        good.update(actor_name=always_fail.actor_name, message_timestamp=draw(st.integers(-(2**70), 2**70)))
        return kind, encode(good)
    size = draw(st.integers(MAX_SIZE + 1, MAX_SIZE * 3))
    good["args"] = ["x" * size]
    return kind, encode(good)


def one_of_each(queue: str) -> list[Poison]:
    """One payload of every kind, always tried first."""

    def make(kind: str, payload: bytes) -> Poison:
        value = Poison(payload)
        value.kind = kind
        return value

    fail = always_fail.actor_name
    return [
        make("bytes", b"\x00\xff\xfe<script>"),
        make("json", b"[1, 2, 3]"),
        make("field", encode({**message_dict(queue), "args": {"not": "a list"}})),
        make("missing", encode({"queue_name": queue, "actor_name": "record"})),
        make("unknown_actor", encode(message_dict(queue, actor_name="no_such_actor"))),
        make("arguments", encode(message_dict(queue, args=[1, 2, 3]))),
        # json writes Infinity; a JSON column stores none: the row keeps the raw payload.
        make("arguments", encode(message_dict(queue, args=[1, float("inf")]))),
        make("options", encode(message_dict(queue, actor_name=fail, options={"retries": "many"}))),
        make("timestamp", encode(message_dict(queue, actor_name=fail, message_timestamp=2**70))),
        make("oversized", encode(message_dict(queue, args=["x" * (MAX_SIZE + 1)]))),
    ]


def test_poison_input_never_kills_a_worker(case, queue, record_dir, workers, figures):
    broker = case.make(max_message_size=MAX_SIZE)
    options = {**case.process_options(), "max_message_size": MAX_SIZE}
    w = workers(case.url, "--processes", "1", "--threads", "4", "--queues", queue, broker_options=options)
    (child,) = w.wait_children(1)
    good: set[str] = set()
    kinds: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        # Shrinking re-runs failing examples against live workers: far too slow to be useful.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(poison(queue), min_size=1, max_size=3))
    @example(batch=one_of_each(queue))
    def push(batch: list[Poison]) -> None:
        before = DeadLetter.objects.filter(queue_name=queue).count()
        first = broker.enqueue(record.message_with_options(args=("good",), queue_name=queue))
        for payload in batch:
            broker.enqueue_raw(queue, bytes(payload))
            kinds[payload.kind] = kinds.get(payload.kind, 0) + 1
        last = broker.enqueue(record.message_with_options(args=("good",), queue_name=queue))
        good.update((first.message_id, last.message_id))
        expected = before + len(batch)
        wait_for(
            lambda: (
                executions(record_dir)[0] >= good
                and DeadLetter.objects.filter(queue_name=queue).count() >= expected
            ),
            timeout=20,
            message=f"good messages to run and {len(batch)} dead letters for {batch!r}",
        )
        assert DeadLetter.objects.filter(queue_name=queue).count() == expected, batch

    push()
    assert w.children() == [child], "the worker process died"
    assert "exited with" not in w.output() and "unexpected error" not in w.output()
    rows = list(DeadLetter.objects.filter(queue_name=queue))
    for row in rows:
        assert row.exception_type and row.exception_message.strip(), row
        assert "\x00" not in row.exception_message
    seen, runs = executions(record_dir)
    assert seen >= good
    assert w.stop() == 0
    figures.add(
        "4. poison input (hypothesis)", case.name, messages=len(good) + len(rows),
        faults=f"{len(rows)} bad payloads: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        lost=len(good - seen), duplicated=runs - len(seen), dead_letters=len(rows),
    )  # fmt: skip


def test_oversized_arguments_are_refused_at_send(case, queue):
    broker = case.make(max_message_size=MAX_SIZE)

    @actor(broker=broker, actor_name="rel_big", queue_name=queue)
    def rel_big(blob: str) -> None: ...

    with pytest.raises(MessageTooLarge, match=r"over the maximum of 65536 \(DJQUEUE\['MAX_MESSAGE_SIZE'\]\)"):
        rel_big.send("x" * MAX_SIZE)
    rel_big.send("x" * 100)
    assert broker.get_queue_stats(queue).ready == 1, "the refused message was not stored"
