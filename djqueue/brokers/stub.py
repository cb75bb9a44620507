"""An in-memory broker for tests: one process, no server, the full contract."""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..errors import DecodeError
from ..message import Message, current_millis
from .base import Broker, Consumer, MessageProxy, QueueStats


class _Queue:
    def __init__(self) -> None:
        # (-priority, eta, seq, message_id, data, delivery_count)
        self.heap: list[tuple[int, int, int, str, bytes, int]] = []
        self.in_flight: dict[int, tuple[int, str, bytes, int]] = {}
        self.dead: list[bytes] = []


class StubBroker(Broker):
    """Keeps queues in memory. ``stub://`` in DJQUEUE["BROKER_URL"]."""

    scheme = "stub"

    def __init__(self, middleware: Any = None, **kwargs: Any) -> None:
        self._lock = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        # While True, time skips ahead to the next delayed message (delay=, eta=, a
        # retry's backoff) whenever nothing is due or running: drain() sets it, so that a
        # test need not wait out real backoffs, while a retry still comes after the jobs
        # it may be waiting for (a rate limiter's holder) have finished.
        self.run_delayed = False
        super().__init__(middleware, **kwargs)

    def _skip_ahead(self, now: int) -> bool:
        """Whether a delayed message may run now, early (called holding the lock)."""
        return self.run_delayed and not any(
            q.in_flight or any(item[1] <= now for item in q.heap) for q in self._queues.values()
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> StubBroker:
        return cls(**options)

    def _declare_queue(self, queue_name: str) -> None:
        with self._lock:
            self._queues.setdefault(queue_name, _Queue())

    def _push(
        self, queue_name: str, message_id: str, priority: int, eta: int, data: bytes, count: int
    ) -> None:
        queue = self._queues[queue_name]
        heapq.heappush(queue.heap, (-priority, eta, next(self._seq), message_id, data, count))

    def _enqueue(self, message: Message, data: bytes) -> None:
        with self._lock:
            self._push(message.queue_name, message.message_id, message.priority, message.eta or 0, data, 0)
            self._lock.notify_all()

    def enqueue_raw(self, queue_name: str, data: bytes) -> None:
        """Put arbitrary bytes on a queue, as a misbehaving producer would (for tests)."""
        self.declare_queue(queue_name)
        with self._lock:
            self._push(queue_name, "", 0, 0, data, 0)
            self._lock.notify_all()

    def consume(self, queue_name: str, *, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        self.declare_queue(queue_name)
        return _StubConsumer(self, queue_name, prefetch, timeout)

    def _pop_due(self, queue: _Queue, now: int | float) -> tuple[int, str, bytes, int] | None:
        # Due messages in priority order; the heap is ordered by priority then eta, so a
        # delayed high-priority message must not hide a due lower-priority one.
        due = [item for item in queue.heap if item[1] <= now]
        if not due:
            return None
        best = min(due)
        queue.heap.remove(best)
        heapq.heapify(queue.heap)
        return best[2], best[3], best[4], best[5] + 1

    def get_queue_stats(self, queue_name: str) -> QueueStats:
        self.declare_queue(queue_name)
        with self._lock:
            queue = self._queues[queue_name]
            now = current_millis()
            delayed = sum(1 for item in queue.heap if item[1] > now)
            return QueueStats(len(queue.heap) - delayed, delayed, len(queue.in_flight), len(queue.dead))

    def purge(self, queue_name: str) -> None:
        self.declare_queue(queue_name)
        with self._lock:
            queue = self._queues[queue_name]
            queue.heap.clear()
            queue.dead.clear()

    def cancel(self, message_id: str, *, queue_name: str | None = None) -> bool:
        with self._lock:
            names = [queue_name] if queue_name else list(self._queues)
            for name in names:
                queue = self._queues.get(name)
                if queue is None:
                    continue
                for item in queue.heap:
                    if item[3] == message_id:
                        queue.heap.remove(item)
                        heapq.heapify(queue.heap)
                        return True
        return False

    def dead_letters(self, queue_name: str) -> list[bytes]:
        with self._lock:
            return list(self._queues[queue_name].dead)


class _StubConsumer(Consumer):
    def __init__(self, broker: StubBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.timeout = timeout / 1000
        self.outstanding: set[int] = set()

    def __next__(self) -> MessageProxy | None:
        broker = self.broker
        deadline = time.monotonic() + self.timeout
        with broker._lock:
            queue = broker._queues[self.queue_name]
            while True:
                if len(self.outstanding) < self.prefetch:
                    now = current_millis()
                    item = broker._pop_due(queue, now)
                    if item is None and broker._skip_ahead(now):
                        item = broker._pop_due(queue, math.inf)
                    if item is not None:
                        seq, message_id, data, count = item
                        queue.in_flight[seq] = (seq, message_id, data, count)
                        self.outstanding.add(seq)
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                broker._lock.wait(min(remaining, 0.05))
        try:
            message = Message.decode(data)
        except DecodeError as e:
            return MessageProxy.malformed(data, e, self.queue_name, tag=seq, delivery_count=count)
        return MessageProxy(message, data=data, tag=seq, delivery_count=count)

    def _settle(self, proxy: MessageProxy) -> tuple[int, str, bytes, int] | None:
        queue = self.broker._queues[self.queue_name]
        self.outstanding.discard(proxy.tag)
        return queue.in_flight.pop(proxy.tag, None)

    def ack(self, proxy: MessageProxy) -> None:
        with self.broker._lock:
            self._settle(proxy)
            self.broker._lock.notify_all()

    def nack(self, proxy: MessageProxy) -> None:
        with self.broker._lock:
            item = self._settle(proxy)
            if item is not None:
                self.broker._queues[self.queue_name].dead.append(item[2])
            self.broker._lock.notify_all()

    def requeue(self, proxies: Iterable[MessageProxy]) -> None:
        with self.broker._lock:
            for proxy in proxies:
                item = self._settle(proxy)
                if item is not None:
                    priority = proxy.message.priority if proxy.decode_error is None else 0
                    # A requeued message was never started: it does not count as a delivery.
                    self.broker._push(self.queue_name, item[1], priority, 0, item[2], item[3] - 1)
            self.broker._lock.notify_all()

    def close(self) -> None:
        with self.broker._lock:
            queue = self.broker._queues[self.queue_name]
            for seq in list(self.outstanding):
                item = queue.in_flight.pop(seq, None)
                if item is not None:
                    self.broker._push(self.queue_name, item[1], 0, 0, item[2], item[3])
            self.outstanding.clear()
            self.broker._lock.notify_all()
