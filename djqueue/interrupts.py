"""Exceptions raised into a worker thread by another thread (time limits, shutdown
notices), confined to the actor's own code.

An asynchronous exception lands at whatever bytecode its thread runs next. Raised just
after the actor returned, it landed in the worker's bookkeeping or in a middleware hook:
an ack never sent, a pipeline's next step never enqueued, a logging lock never released.
So the worker runs every actor through ``call_actor``, ``interrupt`` raises only into a
thread that is inside it, and an exception not yet delivered when the actor returns is
cancelled there.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_in_actor: set[int] = set()
_interrupted: set[int] = set()


def _set_async_exc(thread_id: int, exception: type[BaseException] | None) -> int:
    # None (NULL) clears the thread's pending asynchronous exception.
    argument = None if exception is None else ctypes.py_object(exception)
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), argument))


def call_actor(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` as the running actor of this thread: ``interrupt`` may reach it."""
    thread_id = threading.get_ident()
    with _lock:
        _interrupted.discard(thread_id)
        _in_actor.add(thread_id)
    try:
        return fn(*args, **kwargs)
    finally:
        with _lock:
            _in_actor.discard(thread_id)
            if thread_id in _interrupted:
                _interrupted.discard(thread_id)
                _set_async_exc(thread_id, None)


def interrupt(thread_id: int, exception: type[BaseException]) -> bool:
    """Raise ``exception`` in the thread ``thread_id`` if it is running an actor (at its
    next bytecode; inside a C call, such as a socket read or ``time.sleep``, when that
    call returns). False if it is not running one, or was interrupted already."""
    with _lock:
        if thread_id not in _in_actor or thread_id in _interrupted:
            return False
        _interrupted.add(thread_id)
        return _set_async_exc(thread_id, exception) == 1
