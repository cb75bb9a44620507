"""Composing messages: ``pipeline`` runs them one after another, ``group`` side by side.

::

    from djqueue import group, pipeline

    p = pipeline([fetch.message(url), parse.message(), save.message_with_options(pipe_ignore=True)])
    p.run()
    p.get_result(block=True, timeout=30_000)

    g = group([resize.message(image_id, size) for size in (64, 256, 1024)])
    g.add_completion_callback(notify.message(image_id))
    g.run()
    g.get_results(block=True, timeout=60_000)

The results that composition reads are stored even when the actor does not set
``store_results=True``: ``pipeline.run()`` stores the result of its last message and
``group.run()`` that of each member (of each pipeline's last message). Results are
kept for ``DJQUEUE["RESULT_TTL"]`` ms, so a group must complete within that time for
its completion callbacks to fire.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, ResultTimeout
from .message import Message, generate_unique_id
from .results.base import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from .brokers.base import Broker

__all__ = ["group", "pipeline"]


def _broker(broker: Broker | None) -> Broker:
    from .brokers import get_broker

    return broker or get_broker()


class pipeline:  # lower case, like group and as in Dramatiq
    """Messages run one after another: each one's result is appended to the next
    message's positional arguments, unless that message has the option
    ``pipe_ignore=True``. The chain stops at the first message that fails for good.

    ``a.message(1) | b.message()`` builds the same thing as ``pipeline([...])``.
    """

    def __init__(self, children: Iterable[Message | pipeline], *, broker: Broker | None = None) -> None:
        self.broker = _broker(broker)
        self.messages: list[Message] = []
        for child in children:
            if isinstance(child, pipeline):
                self.messages.extend(child.messages)
            elif isinstance(child, Message):
                self.messages.append(child)
            else:
                raise TypeError(f"a pipeline is made of messages and pipelines, not {type(child).__name__}")
        if not self.messages:
            raise ConfigurationError("a pipeline needs at least one message")

    def __len__(self) -> int:
        return len(self.messages)

    def __or__(self, other: Message | pipeline) -> pipeline:
        return pipeline([self, other], broker=self.broker)

    @property
    def message_ids(self) -> list[str]:
        return [message.message_id for message in self.messages]

    def build(self, *, last_options: dict[str, Any] | None = None) -> Message:
        """The first message, carrying the rest of the chain in its ``pipe_target`` option.

        The last message gets ``store_results=True`` (and ``last_options``) so that the
        pipeline's result can be read. Message ids do not change.
        """
        messages = list(self.messages)
        messages[-1] = messages[-1].copy(options={"store_results": True, **(last_options or {})})
        target = messages[-1]
        for message in reversed(messages[:-1]):
            target = message.copy(options={"pipe_target": target.asdict()})
        return target

    def run(self, *, delay: int | None = None) -> pipeline:
        """Enqueue the first message (after ``delay`` ms); returns the pipeline."""
        self.broker.enqueue(self.build(), delay=delay)
        return self

    def get_result(self, *, block: bool = False, timeout: int | None = None) -> Any:
        """The result of the last message; see ``Message.get_result``. ResultFailure if
        any message of the chain failed for good."""
        return self.messages[-1].get_result(block=block, timeout=timeout)

    def __repr__(self) -> str:
        return f"pipeline([{', '.join(str(m) for m in self.messages)}])"


class group:  # lower case, like pipeline and as in Dramatiq
    """Messages (or pipelines) run side by side.

    Completion callbacks (messages) are enqueued once, when every member has
    succeeded; a member that fails for good means they never are. Members are counted
    by their stored results, so a member that ran twice counts once.
    """

    def __init__(self, children: Iterable[Message | pipeline], *, broker: Broker | None = None) -> None:
        self.broker = _broker(broker)
        self.children: list[Message | pipeline] = []
        for child in children:
            if not isinstance(child, Message | pipeline):
                raise TypeError(f"a group is made of messages and pipelines, not {type(child).__name__}")
            self.children.append(child)
        self.group_id = generate_unique_id()
        self.callbacks: list[Message] = []

    def __len__(self) -> int:
        return len(self.children)

    @property
    def message_ids(self) -> list[str]:
        """The id of each member's result: a message's own, a pipeline's last message's."""
        return [c.messages[-1].message_id if isinstance(c, pipeline) else c.message_id for c in self.children]

    def add_completion_callback(self, message: Message | pipeline) -> None:
        """Enqueue ``message`` once every member has succeeded. Call before ``run()``."""
        self.callbacks.append(message.build() if isinstance(message, pipeline) else message)

    def run(self, *, delay: int | None = None) -> group:
        """Enqueue every member (after ``delay`` ms); returns the group."""
        options: dict[str, Any] = {"store_results": True}
        if self.callbacks:
            options.update(
                group_id=self.group_id,
                group_size=len(self.children),
                group_callbacks=[callback.asdict() for callback in self.callbacks],
            )
        messages = [
            child.build(last_options=options) if isinstance(child, pipeline) else child.copy(options=options)
            for child in self.children
        ]
        if not messages:
            # Every one of no members has completed.
            messages = list(self.callbacks)
        self.broker.enqueue_many(messages, delay=delay)
        return self

    def get_results(self, *, block: bool = False, timeout: int | None = None) -> list[Any]:
        """Every member's result, in order. ``timeout`` (ms, default 10,000 when
        blocking) is for the whole group. Raises ResultMissing, ResultTimeout, or
        ResultFailure for the first member that failed."""
        from .results import get_result_backend

        backend = get_result_backend()
        ids = self.message_ids
        if not block:
            return [backend.get_result(message_id) for message_id in ids]
        timeout = DEFAULT_TIMEOUT if timeout is None else int(timeout)
        start = time.monotonic()
        results = []
        for message_id, stored in zip(ids, backend.wait_all(ids, timeout=timeout), strict=True):
            if stored is None:
                waited = int((time.monotonic() - start) * 1000)
                raise ResultTimeout(
                    f"group {self.group_id}: no result for member {message_id} after {waited} ms"
                )
            results.append(stored.unwrap(message_id))
        return results

    def wait(self, *, timeout: int | None = None) -> None:
        """Block until every member has a result (``timeout`` ms, default 10,000).
        Raises ResultTimeout, or ResultFailure if a member failed."""
        self.get_results(block=True, timeout=timeout)

    def __repr__(self) -> str:
        return f"group({self.children!r})"
