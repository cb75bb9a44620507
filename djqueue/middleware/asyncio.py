"""async def actors: one event loop thread per worker process runs every coroutine.

A worker thread that runs an async actor submits the coroutine to the loop and waits
for it. Waiting happens in short slices so that TimeLimit and ShutdownNotifications,
which raise an exception in the waiting thread, are seen promptly; the coroutine is
then cancelled on the loop. Async actors therefore count against the worker's thread
count like sync ones (``--threads`` bounds how many run at once per process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .base import Middleware

T = TypeVar("T")


class EventLoopThread(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="djqueue-event-loop", daemon=True)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self.ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(timeout)


_thread: EventLoopThread | None = None
_lock = threading.Lock()


def get_event_loop_thread() -> EventLoopThread:
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = EventLoopThread()
            _thread.start()
            _thread.ready.wait()
        return _thread


def stop_event_loop_thread() -> None:
    global _thread
    with _lock:
        if _thread is not None:
            _thread.stop()
            _thread = None


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on the process's event loop thread and return its result."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coroutine.close()
        raise RuntimeError(
            "an async actor cannot be called synchronously from a running event loop; await it"
        )
    future = asyncio.run_coroutine_threadsafe(coroutine, get_event_loop_thread().loop)
    try:
        while True:
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                continue
    except BaseException:
        # TimeLimitExceeded or Shutdown raised in this thread: stop the coroutine too.
        future.cancel()
        raise


class AsyncIO(Middleware):
    """Starts the event loop thread when a worker boots and stops it at shutdown."""

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        if any(actor.is_async for actor in broker.actors.values()):
            get_event_loop_thread()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        stop_event_loop_thread()
