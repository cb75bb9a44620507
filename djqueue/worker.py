"""One worker process: consumer threads that fetch, worker threads that run actors.

The worker knows only the broker contract (brokers/base.py) and the middleware hooks;
retries, time limits, results and dead letters are all middleware.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from .brokers.base import Broker, Consumer, MessageProxy
from .brokers.reconnecting import Reconnecting
from .errors import ConnectionError, MessageTooLarge, SkipMessage
from .interrupts import call_actor

logger = logging.getLogger("djqueue.worker")

_STOP = object()

# What becomes of messages whose settling failed (see _safe).
_MAY_COME_AGAIN = "it may be delivered again"
_GIVEN_BACK_LATER = (
    "the broker delivers them again once this consumer is closed, or its heartbeat, lease or connection ends"
)
_CLOSED_LATER = "the broker delivers what it held again once its heartbeat, lease or connection ends"


class Worker:
    """Consumes ``queues`` (default: every declared queue) with ``worker_threads`` threads.

    ``prefetch`` bounds the unacked messages each queue's consumer holds (default:
    twice the thread count). ``worker_timeout`` (ms) is how long a blocked consumer
    waits before checking whether it should stop.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        queues: Iterable[str] | None = None,
        worker_threads: int = 8,
        worker_timeout: int = 1000,
        prefetch: int | None = None,
    ) -> None:
        self.broker = broker
        self.queues = set(queues) if queues else None
        self.worker_threads = worker_threads
        self.worker_timeout = worker_timeout
        self.prefetch = prefetch or worker_threads * 2
        self.work_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.consumers: dict[str, _ConsumerThread] = {}
        self.workers: list[_WorkerThread] = []
        self.stopping = threading.Event()

    def start(self) -> None:
        self.broker.emit_before("worker_boot", self)
        queue_names = self.queues or self.broker.get_declared_queues()
        for queue_name in sorted(queue_names):
            self.broker.declare_queue(queue_name)
            consumer = _ConsumerThread(self, queue_name)
            consumer.start()
            self.consumers[queue_name] = consumer
        for _ in range(self.worker_threads):
            worker = _WorkerThread(self)
            worker.start()
            self.workers.append(worker)
        self.broker.emit_after("worker_boot", self)

    def stop(self, timeout: int = 30_000) -> None:
        """Stop gracefully: stop fetching, give unstarted messages back, let running
        actors finish for up to ``timeout`` ms, then give back what is still running."""
        logger.info("worker stopping; waiting up to %d ms for running messages", timeout)
        self.broker.emit_before("worker_shutdown", self)
        deadline = time.monotonic() + timeout / 1000
        self.stopping.set()
        for consumer in self.consumers.values():
            consumer.stop_fetching.set()
        for consumer in self.consumers.values():
            consumer.fetching_stopped.wait(max(0.0, deadline - time.monotonic()))
        self._requeue_unstarted()
        for _ in self.workers:
            self.work_queue.put(_STOP)
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        abandoned = [w.current for w in self.workers if w.is_alive() and w.current is not None]
        for consumer_thread, consumer, proxy in abandoned:
            logger.warning("message %s did not finish in time; giving it back", proxy.message_id)
            consumer_thread.give_back(consumer, [proxy])
        self._requeue_unstarted()
        for consumer in self.consumers.values():
            consumer.close_now.set()
        for consumer in self.consumers.values():
            consumer.join(max(0.5, deadline - time.monotonic()))
        self.broker.emit_after("worker_shutdown", self)

    def _requeue_unstarted(self) -> None:
        pending: dict[tuple[_ConsumerThread, Consumer], list[MessageProxy]] = {}
        while True:
            try:
                item = self.work_queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                continue
            consumer_thread, consumer, proxy = item
            pending.setdefault((consumer_thread, consumer), []).append(proxy)
        for (consumer_thread, consumer), proxies in pending.items():
            consumer_thread.give_back(consumer, proxies)

    def join(self, timeout: int | None = None) -> None:
        """Wait until every consumed queue is empty and nothing is running (for tests).

        Raises TimeoutError after ``timeout`` ms.
        """
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            for queue_name in self.consumers:
                remaining = None if deadline is None else int((deadline - time.monotonic()) * 1000)
                self.broker.join(queue_name, timeout=remaining)
            idle = self.work_queue.empty() and all(w.current is None for w in self.workers)
            # A retry may have been enqueued while we looked: look once more.
            if idle and all(self.broker.get_queue_stats(q)[:3] == (0, 0, 0) for q in self.consumers):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"worker still busy after {timeout} ms")
            time.sleep(0.01)

    def process_message(
        self, consumer_thread: _ConsumerThread, consumer: Consumer, proxy: MessageProxy
    ) -> None:
        try:
            self._run(proxy)
        except BaseException:
            # Escaped the worker's own handling: the outcome is unknown, so the message
            # is given back to be delivered again, never acked nor left unsettled.
            consumer_thread.give_back(consumer, [proxy])
            raise
        # On the consumer that delivered it: the thread may have replaced that one since.
        try:
            self.settle(consumer, proxy)
        finally:
            consumer_thread.settled(consumer)

    def _run(self, proxy: MessageProxy) -> None:
        broker = self.broker
        # The broker's lists of overridden hooks, looked up per message (middleware may be
        # added at any time); calling them here rather than through emit_before/emit_after
        # saves a few microseconds per message on the hottest path.
        hooks = broker._hooks
        actor = None
        try:
            if proxy.data is not None and len(proxy.data) > broker.max_message_size:
                # Put on the queue by something that bypassed send()'s size check.
                too_large = MessageTooLarge(
                    f"payload is {len(proxy.data)} bytes, over the maximum of "
                    f"{broker.max_message_size} (DJQUEUE['MAX_MESSAGE_SIZE']); not run"
                )
                proxy.stuff_exception(too_large)
                proxy.fail(str(too_large))
            elif proxy.decode_error is None:
                actor = broker.actors.get(proxy.message.actor_name)
                if actor is None:
                    proxy.fail(
                        f"unknown actor {proxy.message.actor_name!r}: no @actor with this name "
                        "is registered in this worker"
                    )
                else:
                    for hook in hooks["before_process_message"]:
                        hook(broker, proxy)
                    message = proxy.message
                    result = call_actor(actor, *message.args, **message.kwargs)
                    proxy.result = result
                    _emit_after(broker, hooks["after_process_message"], proxy, result=result)
        except SkipMessage:
            broker.emit_after("skip_message", proxy)
        except BaseException as e:
            if isinstance(e, TypeError) and actor is not None:
                reason = actor.check_arguments(proxy.message.args, proxy.message.kwargs)
                if reason is not None:
                    proxy.fail(reason)
            proxy.stuff_exception(e)
            if not proxy.failed:
                logger.warning(
                    "%s failed (message %s): %r",
                    proxy.message,
                    proxy.message_id,
                    e,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
            broker.emit_after("process_message", proxy, exception=e)

    def settle(self, consumer: Consumer, proxy: MessageProxy) -> None:
        broker = self.broker
        if proxy.failed:
            logger.error("dead-lettering %s: %s", proxy.message_id, proxy.reason or repr(proxy.exception))
            try:
                broker.emit_before("nack", proxy)
            except Exception:
                logger.exception("before_nack failed for %s", proxy.message_id)
            _safe(consumer.nack, proxy, "dead-letter", _MAY_COME_AGAIN)
            broker.emit_after("nack", proxy)
        else:
            hooks = broker._hooks
            try:
                for hook in hooks["before_ack"]:
                    hook(broker, proxy)
            except Exception:
                logger.exception("before_ack failed for %s", proxy.message_id)
            _safe(consumer.ack, proxy, "ack", _MAY_COME_AGAIN)
            _emit_after(broker, hooks["after_ack"], proxy)


def _emit_after(broker: Broker, hooks: list[Any], proxy: MessageProxy, **kwargs: Any) -> None:
    # Broker.emit_after for one of its hook lists: reverse order, a failure only logged.
    for hook in reversed(hooks):
        try:
            hook(broker, proxy, **kwargs)
        except Exception:
            logger.exception("middleware hook %s failed", getattr(hook, "__qualname__", hook))


def _safe(fn: Any, arg: Any, what: str, consequence: str, subject: str = "", *, quiet: bool = False) -> None:
    """``fn(arg)``, logging a failure as "could not <what> <subject>: <error>; <consequence>"
    rather than raising it: a broker that cannot be reached while messages are settled must
    not stop the worker. ``subject`` defaults to "message <id>" of the proxy ``arg``. A lost
    connection is one WARNING line (DEBUG if ``quiet``), its traceback only at DEBUG; any
    other error is logged with its traceback."""
    try:
        fn(arg)
    except Exception as e:
        subject = subject or f"message {arg.message_id}"
        if not isinstance(e, ConnectionError):
            logger.exception("could not %s %s; %s", what, subject, consequence)
            return
        level = logging.DEBUG if quiet else logging.WARNING
        debug = logger.isEnabledFor(logging.DEBUG)
        logger.log(level, "could not %s %s: %s; %s", what, subject, e, consequence, exc_info=debug)


def _close_consumer(consumer: Consumer) -> None:
    consumer.close()


class _ConsumerThread(threading.Thread):
    def __init__(self, worker: Worker, queue_name: str) -> None:
        super().__init__(name=f"djqueue-consumer-{queue_name}", daemon=True)
        self.worker = worker
        self.queue_name = queue_name
        self.stop_fetching = threading.Event()
        self.fetching_stopped = threading.Event()
        self.close_now = threading.Event()
        self.consumer: Consumer | None = self._connect()
        # Messages handed to the worker threads and not yet settled, per consumer; a
        # consumer that failed is retired, not closed, while some of its messages run:
        # closing gives back everything it holds, and a running message given back
        # would run twice at once.
        self.lock = threading.Lock()
        self.unsettled: dict[Consumer, int] = {}
        self.retired: set[Consumer] = set()

    def _connect(self) -> Consumer:
        worker = self.worker
        return worker.broker.consume(self.queue_name, prefetch=worker.prefetch, timeout=worker.worker_timeout)

    def settled(self, consumer: Consumer, count: int = 1) -> None:
        """``count`` messages of ``consumer`` were acked, nacked or given back."""
        with self.lock:
            left = self.unsettled[consumer] = self.unsettled.get(consumer, 0) - count
            done = left <= 0 and consumer in self.retired
            if done:
                self.retired.discard(consumer)
                self.unsettled.pop(consumer, None)
        if done:
            self._close(consumer)

    def give_back(self, consumer: Consumer, proxies: list[MessageProxy]) -> None:
        try:
            subject = f"{len(proxies)} message(s) of {self.queue_name!r}"
            _safe(consumer.requeue, proxies, "give back", _GIVEN_BACK_LATER, subject)
        finally:
            self.settled(consumer, len(proxies))

    def _close(self, consumer: Consumer, *, quiet: bool = False) -> None:
        # Closing gives back what the consumer still holds; if it cannot, the broker does.
        subject = f"of {self.queue_name!r}"
        _safe(_close_consumer, consumer, "close the consumer", _CLOSED_LATER, subject, quiet=quiet)

    def _retire(self, consumer: Consumer) -> None:
        with self.lock:
            busy = self.unsettled.get(consumer, 0) > 0
            if busy:
                self.retired.add(consumer)
            else:
                self.unsettled.pop(consumer, None)
        if not busy:
            # Quiet: a close that fails as the fetch did adds nothing to the line run() logs.
            self._close(consumer, quiet=True)

    def run(self) -> None:
        # One WARNING line per failed attempt, with backoff, as on every broker.
        reconnecting = Reconnecting(self.worker.broker, self.queue_name, logger)
        put = self.worker.work_queue.put
        while not self.stop_fetching.is_set():
            consumer = self.consumer
            try:
                if consumer is None:
                    consumer = self.consumer = self._connect()
                proxy = next(consumer)
            except Exception as e:
                delay = reconnecting.failed(e, expected=isinstance(e, ConnectionError))
                if consumer is not None:
                    # A failed fetch may have taken messages it never got: closed, not
                    # reused, once the messages it handed out are settled.
                    self.consumer = None
                    self._retire(consumer)
                if self.stop_fetching.wait(delay):
                    break
                continue
            reconnecting.succeeded()
            if proxy is not None:
                with self.lock:
                    self.unsettled[consumer] = self.unsettled.get(consumer, 0) + 1
                put((self, consumer, proxy))
        self.fetching_stopped.set()
        self.worker.broker.emit_before("consumer_thread_shutdown", self)
        self.close_now.wait()
        with self.lock:
            consumers = [*self.retired, *([self.consumer] if self.consumer is not None else [])]
            self.retired.clear()
        for consumer in consumers:
            self._close(consumer)


class _WorkerThread(threading.Thread):
    def __init__(self, worker: Worker) -> None:
        super().__init__(name="djqueue-worker", daemon=True)
        self.worker = worker
        self.current: tuple[_ConsumerThread, Consumer, MessageProxy] | None = None

    def run(self) -> None:
        worker = self.worker
        get = worker.work_queue.get
        process = worker.process_message
        while True:
            item = get()
            if item is _STOP:
                break
            if worker.stopping.is_set():
                consumer_thread, consumer, proxy = item
                consumer_thread.give_back(consumer, [proxy])
                continue
            self.current = item
            try:
                process(*item)
            except BaseException:
                logger.exception("unexpected error processing a message")
            finally:
                self.current = None
        worker.broker.emit_before("worker_thread_shutdown", self)
