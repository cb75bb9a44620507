"""runworkers' parent process: starts, watches, restarts and signals worker processes.

Signals: SIGTERM or SIGINT stops gracefully (workers stop fetching, finish or give
back the messages in hand, and the supervisor exits 0); a second one forces (workers
are killed; their unacked messages are redelivered by the broker). SIGHUP restarts
the workers gracefully; a SIGTERM or SIGINT while the old ones stop turns the restart
into a stop. A worker process that dies is restarted, with a growing
delay if it keeps dying at start-up.

Worker processes are forked from the supervisor, which has Django set up already, so
one starts in milliseconds instead of a second of imports, and shares the supervisor's
memory pages until it writes to them. The supervisor forks only while that is safe and
right: no other thread is running in it (a lock held by one would stay locked in the
child forever), its database connections are closed first, and the code it loaded is
still the code to run. After SIGHUP or a --watch reload, and with --metrics-port (whose
server threads run in the supervisor), worker processes are spawned: a fresh
interpreter that imports everything anew.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger("djqueue.supervisor")

# Exit codes of a worker process.
EXIT_OK = 0
EXIT_FORCED = 2
EXIT_BOOT_FAILED = 3

# What the supervisor forwards to its workers; blocked while it forks one (see _start).
_FORWARDED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


@dataclass
class WorkerConfig:
    """What every worker process is started with. Times in ms."""

    threads: int = 8
    queues: list[str] | None = None
    shutdown_timeout: int = 30_000
    log_file: str | None = None
    log_level: str = "INFO"
    prefetch: int | None = None
    metrics: bool = False  # add the Prometheus middleware (runworkers --metrics-port)
    # Whose worker processes these are; default: the process that starts them.
    supervisor_pid: int = field(default_factory=os.getpid)
    extra: dict[str, Any] = field(default_factory=dict)


def configure_logging(log_file: str | None, level: str = "INFO") -> None:
    """Send the ``djqueue`` loggers' records to stderr (or ``log_file``) at ``level``,
    unless the project's logging already shows them.

    A project whose ``LOGGING`` (or its own set-up) gives ``djqueue``, or a logger above it
    up to the root, a handler that takes warnings keeps its configuration: its handlers
    and formats, and its level for ``djqueue`` if it set one (else ``level``). Otherwise
    djqueue's own stderr handler is added beside any the project has (a Sentry handler
    for errors keeps getting them). ``log_file`` (``--log-file``) is an explicit request:
    djqueue's records go to that file only.
    """
    logger = logging.getLogger("djqueue")
    if log_file is None and _shown_by_project(logger):
        if logger.level == logging.NOTSET or level == "DEBUG":
            logger.setLevel(level)
        return
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(
            "[%(asctime)s] [PID %(process)d] [%(threadName)s] %(levelname)s %(name)s: %(message)s"
        )
    )
    setattr(handler, _OWN_HANDLER, True)
    if log_file:
        logger.handlers = [handler]
        logger.propagate = False
    else:
        logger.handlers = [h for h in logger.handlers if not getattr(h, _OWN_HANDLER, False)] + [handler]
    logger.setLevel(level)


# Marks the handler configure_logging installs, so that a second call (a spawned worker,
# the scheduler) replaces it rather than taking it for the project's.
_OWN_HANDLER = "djqueue_default_handler"


def _shown_by_project(logger: logging.Logger) -> bool:
    """Whether a handler of the project's, on ``logger`` or above it, takes its warnings."""
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if not getattr(handler, _OWN_HANDLER, False) and handler.level <= logging.WARNING:
                return True
        if not node.propagate:
            return False
        node = node.parent
    return False


def worker_process_main(config: WorkerConfig, index: int) -> None:
    """Entry point of one worker process, forked from the supervisor or spawned."""
    # The supervisor forwards SIGTERM on Ctrl-C; ignoring SIGINT here keeps a terminal's
    # Ctrl-C, which reaches the whole process group, from counting as a second signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = threading.Event()
    # Known before boot: a supervisor killed while this process boots must still be noticed.
    parent = config.supervisor_pid

    def on_term(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(EXIT_FORCED)
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    # A forked worker starts with these blocked, so that none reaches the supervisor's
    # handlers it inherited; with its own in place, a pending one is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED_SIGNALS)
    try:
        from django.apps import apps

        if not apps.ready:
            # Spawned. A forked worker inherited the supervisor's set-up Django: setting
            # it up again would re-apply LOGGING and could disable djqueue's loggers.
            import django

            django.setup()
        configure_logging(config.log_file, config.log_level)
        from .brokers import get_broker
        from .worker import Worker

        broker = get_broker()
        from .middleware.heartbeats import Heartbeats

        if broker.get_middleware(Heartbeats) is None:
            broker.add_middleware(Heartbeats())
        if config.metrics:
            from .middleware.prometheus import Prometheus

            Prometheus.install(broker)
        worker = Worker(broker, queues=config.queues, worker_threads=config.threads, prefetch=config.prefetch)
        worker.start()
    except Exception:
        logging.getLogger("djqueue.worker").exception("worker process %d failed to boot", index)
        sys.exit(EXIT_BOOT_FAILED)
    logging.getLogger("djqueue.worker").info("worker process %d started (pid %d)", index, os.getpid())
    # Wake once a second to notice an orphaning (the supervisor was SIGKILLed).
    while not stop.wait(1.0):
        if os.getppid() != parent:
            logging.getLogger("djqueue.worker").warning("supervisor is gone; stopping")
            break
    worker.stop(timeout=config.shutdown_timeout)
    broker.close()
    sys.exit(EXIT_OK)


class _Child:
    def __init__(self, index: int, process: multiprocessing.process.BaseProcess) -> None:
        self.index = index
        self.process = process
        self.started_at = time.monotonic()


class Supervisor:
    """Runs ``processes`` worker processes and keeps them running.

    ``start_method`` is how a worker process starts: "auto" forks it while that is safe
    (see the module docstring) and spawns it otherwise; "fork" and "spawn" force one.
    Extra processes (the scheduler) are always spawned.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        processes: int,
        pid_file: str | None = None,
        watch: list[Path] | None = None,
        extra_processes: list[tuple[str, Callable[..., None], tuple[Any, ...]]] | None = None,
        on_worker_exit: Callable[[int], None] | None = None,
        start_method: Literal["auto", "fork", "spawn"] = "auto",
    ) -> None:
        if start_method not in ("auto", "fork", "spawn"):
            raise ValueError(f"start_method must be 'auto', 'fork' or 'spawn', not {start_method!r}")
        forkable = "fork" in multiprocessing.get_all_start_methods()
        if start_method == "fork" and not forkable:
            raise ValueError("start_method='fork' is not available on this platform")
        self.config = config
        self.processes = processes
        self.pid_file = pid_file
        self.watch = watch
        self.extra_processes = extra_processes or []
        self.on_worker_exit = on_worker_exit  # called with the pid of each worker that exited
        self.start_method = start_method
        self.context = multiprocessing.get_context("spawn")
        self.fork_context = multiprocessing.get_context("fork") if forkable else None
        # Set by SIGHUP and --watch: the code or settings this process loaded are stale.
        self.reloaded = False
        self.children: dict[int, _Child] = {}
        self.extra_children: dict[str, multiprocessing.process.BaseProcess] = {}
        self.extra_started: dict[str, float] = {}
        self.pending: dict[int | str, float] = {}  # process key -> when to restart it
        self.failures: dict[int | str, int] = {}
        self.signals: list[int] = []

    # -- processes ------------------------------------------------------------------

    def can_fork(self) -> bool:
        """Whether the next worker process is forked from this one rather than spawned."""
        if self.start_method != "auto":
            return self.start_method == "fork"
        if self.fork_context is None or self.reloaded or self.config.metrics:
            return False
        # The process must have Django set up (runworkers has), or there is nothing to share.
        django_apps = sys.modules.get("django.apps")
        if django_apps is None or not django_apps.apps.ready:
            return False
        return threading.active_count() == 1

    def _start(self, index: int) -> None:
        name = f"djqueue-worker-{index}"
        if self.can_fork():
            assert self.fork_context is not None
            process: multiprocessing.process.BaseProcess = self.fork_context.Process(
                target=self._forked_worker_main, args=(index,), name=name, daemon=False
            )
            _prepare_fork()
            try:
                with _signals_blocked():
                    process.start()
            finally:
                gc.unfreeze()  # frozen for the child's sake only
        else:
            process = self.context.Process(
                target=worker_process_main, args=(self.config, index), name=name, daemon=False
            )
            process.start()
        self.children[index] = _Child(index, process)

    def _forked_worker_main(self, index: int) -> None:
        # Runs in the forked child. The wake-up socket is the supervisor's alone: a signal
        # handler here must never write to it.
        self._wake_r.close()
        self._wake_w.close()
        worker_process_main(self.config, index)

    def _start_extra(self, name: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        process = self.context.Process(target=target, args=args, name=f"djqueue-{name}", daemon=False)
        process.start()
        self.extra_children[name] = process
        self.extra_started[name] = time.monotonic()

    def _all_processes(self) -> list[multiprocessing.process.BaseProcess]:
        return [c.process for c in self.children.values()] + list(self.extra_children.values())

    def _signal_all(self, signum: int) -> None:
        for process in self._all_processes():
            if process.pid is not None and process.is_alive():
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    def _wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for process in self._all_processes():
            process.join(max(0.0, deadline - time.monotonic()))
        return not any(p.is_alive() for p in self._all_processes())

    # -- signals --------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        # Written to by the signal handler, so that the loop's wait() wakes up at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._install_signals()
        if self.pid_file:
            Path(self.pid_file).write_text(f"{os.getpid()}\n")
        try:
            return self._run()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            if self.pid_file:
                try:
                    os.unlink(self.pid_file)
                except FileNotFoundError:
                    pass

    def _run(self) -> int:
        for index in range(self.processes):
            self._start(index)
        for name, target, args in self.extra_processes:
            self._start_extra(name, target, args)
        snapshot = _snapshot(self.watch) if self.watch else None
        last_scan = time.monotonic()
        while True:
            sentinels = [p.sentinel for p in self._all_processes()]
            wait([*sentinels, self._wake_r], timeout=self._next_wait())
            self._drain_wake()
            while self.signals:
                signum = self.signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    return self._shutdown()
                if signum == signal.SIGHUP:
                    logger.info("SIGHUP: restarting worker processes")
                    if (deadline := self._restart_all()) is not None:
                        return self._shutdown(deadline=deadline)
            self._reap()
            if snapshot is not None and time.monotonic() - last_scan >= 1.0:
                last_scan = time.monotonic()
                current = _snapshot(self.watch)
                if current != snapshot:
                    snapshot = current
                    logger.info("code changed: restarting worker processes")
                    if (deadline := self._restart_all()) is not None:
                        return self._shutdown(deadline=deadline)

    def _drain_wake(self) -> None:
        # Left unread, the wake-up socket would make every later wait() return at once.
        try:
            while self._wake_r.recv(64):
                pass
        except (BlockingIOError, OSError):
            pass

    def _await_exit(self, deadline: float) -> Literal["exited", "late", "stop"]:
        """Wait until every process exited or ``deadline``, watching for signals meanwhile:
        "stop" as soon as a SIGTERM or SIGINT arrives (any signal after it stays queued,
        so that a second one still forces). A SIGHUP then is dropped: the processes are
        stopping already."""
        while True:
            # Before waiting: a signal may have come while the caller ran.
            signals, self.signals = self.signals, []
            for i, signum in enumerate(signals):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.signals[:0] = signals[i + 1 :]
                    return "stop"
                logger.info("SIGHUP ignored: the worker processes are stopping already")
            alive = [p for p in self._all_processes() if p.is_alive()]
            if not alive:
                return "exited"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "late"
            wait([*(p.sentinel for p in alive), self._wake_r], timeout=min(remaining, 1.0))
            self._drain_wake()

    def _kill_all(self) -> None:
        self._signal_all(signal.SIGKILL)
        self._wait_all(5)

    def _reap(self) -> None:
        """Notice dead processes and restart them; one that keeps dying soon after its
        start waits longer each time (up to 30 s), without blocking this loop."""
        now = time.monotonic()
        for index, child in list(self.children.items()):
            if child.process.is_alive():
                continue
            logger.error(
                "worker process %d (pid %s) exited with %s; restarting",
                index,
                child.process.pid,
                child.process.exitcode,
            )
            self.pending[index] = now + self._backoff(index, now - child.started_at)
            self._worker_exited(child)
            del self.children[index]
        for name, process in list(self.extra_children.items()):
            if process.is_alive():
                continue
            logger.error("%s process exited with %s; restarting", name, process.exitcode)
            self.pending[name] = now + self._backoff(name, now - self.extra_started[name])
            process.close()
            del self.extra_children[name]
        for key, due in list(self.pending.items()):
            if due <= now:
                del self.pending[key]
                self._start_key(key)

    def _backoff(self, key: int | str, lived: float) -> float:
        self.failures[key] = self.failures.get(key, 0) + 1 if lived < 5 else 0
        if not self.failures[key]:
            return 0.0
        return min(0.5 * 2 ** (self.failures[key] - 1), 30.0)

    def _start_key(self, key: int | str) -> None:
        if isinstance(key, int):
            self._start(key)
        else:
            target, args = next((t, a) for n, t, a in self.extra_processes if n == key)
            self._start_extra(key, target, args)

    def _next_wait(self) -> float:
        if not self.pending:
            return 1.0
        return max(0.0, min(1.0, min(self.pending.values()) - time.monotonic()))

    def _worker_exited(self, child: _Child) -> None:
        if self.on_worker_exit is not None and child.process.pid is not None:
            try:
                self.on_worker_exit(child.process.pid)
            except Exception:
                logger.exception("on_worker_exit failed for pid %s", child.process.pid)
        child.process.close()

    def _restart_all(self) -> float | None:
        """Stop every process gracefully and start new ones. If a SIGTERM or SIGINT
        comes while the old ones stop, none is started and this returns the deadline
        by which the old ones, signalled already, must have stopped: the caller shuts
        down then."""
        if not self.reloaded and self.can_fork():
            logger.info("worker processes load the code anew from now on (spawned, not forked)")
        # A forked worker would run the code and settings loaded before the change.
        self.reloaded = True
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout / 1000 + 5
        outcome = self._await_exit(deadline)
        if outcome == "stop":
            return deadline
        if outcome == "late":
            self._kill_all()
        for child in self.children.values():
            self._worker_exited(child)
        for process in self.extra_children.values():
            process.close()
        self.children.clear()
        self.extra_children.clear()
        self.pending.clear()
        for index in range(self.processes):
            self._start(index)
        for name, target, args in self.extra_processes:
            self._start_extra(name, target, args)
        return None

    def _shutdown(self, *, deadline: float | None = None) -> int:
        """Stop every process gracefully and return the exit code. With ``deadline``,
        the processes were sent SIGTERM already (a restart was under way; a second one
        would force them), and that is when they must have stopped."""
        logger.info("stopping worker processes (a second SIGTERM/SIGINT forces)")
        if deadline is None:
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + self.config.shutdown_timeout / 1000 + 5
        outcome = self._await_exit(deadline)
        if outcome == "exited":
            return 0
        if outcome == "stop":
            logger.warning("forced stop: killing worker processes")
        else:
            logger.warning("worker processes did not stop in time; killing them")
        self._kill_all()
        return 1


def _prepare_fork() -> None:
    """Leave nothing in this process that a forked child must not share or inherit."""
    django_db = sys.modules.get("django.db")
    if django_db is not None:
        # A connection used by two processes corrupts both; the child opens its own.
        django_db.connections.close_all()
    # Objects that exist now are never collected in the child, so that its garbage
    # collector does not write to (and so copy) the pages it shares with this process.
    gc.freeze()


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold back the forwarded signals while forking: a signal that reached the child
    before worker_process_main installed its handlers would run the supervisor's, and be
    lost. The child unblocks them itself; here they are delivered on leaving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_IGNORED_DIRS = {".git", "__pycache__", "node_modules", ".tox", ".venv", "venv", ".mypy_cache", ".ruff_cache"}


def _snapshot(roots: list[Path] | None) -> dict[str, float]:
    """Modification times of the Python files under ``roots``, for --watch."""
    mtimes: dict[str, float] = {}
    for root in roots or []:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _IGNORED_DIRS]
            for name in filenames:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    try:
                        mtimes[path] = os.stat(path).st_mtime
                    except FileNotFoundError:
                        pass
    return mtimes
