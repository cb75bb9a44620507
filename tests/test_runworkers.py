"""runworkers end to end: real supervisor and worker processes, real signals, on the
database broker (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from django.db import connections, transaction

from djqueue.brokers import broker_from_url
from djqueue.message import Message
from djqueue.models import DeadLetter
from tests.process import ROOT, read_records, run_django, wait_for
from tests.testapp.tasks import always_fail, flaky, record, slow_record

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "postgres"]), pytest.mark.slow]

DATABASES = [
    pytest.param("db://default", id="sqlite"),
    pytest.param("db://postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=DATABASES)
def broker_url(request):
    return request.param


@pytest.fixture
def broker(broker_url):
    broker = broker_from_url(broker_url)
    yield broker
    broker.close()
    for connection in connections.all():
        connection.close()


@pytest.fixture
def queue() -> str:
    return f"rw_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def workers(start_processes):
    return start_processes


def send(broker, actor, *args, queue: str, **options):
    return broker.enqueue(actor.message_with_options(args=args, queue_name=queue, **options))


def ids_seen(record_dir) -> set[str]:
    return {message_id for message_id, _, _ in read_records(record_dir)}


def pids_that_ran(record_dir, message) -> set[int]:
    return {pid for message_id, pid, _ in read_records(record_dir) if message_id == message.message_id}


def test_1000_messages_across_2_processes_x_4_threads(broker, broker_url, queue, record_dir, workers):
    w = workers(broker_url, "--processes", "2", "--threads", "4", "--queues", queue)
    # Both processes consuming before the burst, so the work is shared between them.
    wait_for(lambda: w.output().count("started (pid") == 2, message="two worker processes consuming")
    sent = {send(broker, record, n, queue=queue).message_id for n in range(1000)}
    wait_for(lambda: ids_seen(record_dir) >= sent, timeout=120, message="1000 messages")
    pids = {pid for _, pid, _ in read_records(record_dir)}
    assert len(pids) == 2, "both worker processes took work"
    assert w.stop() == 0
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 0)


def test_sigkilled_worker_loses_no_message_and_is_restarted(broker, broker_url, queue, record_dir, workers):
    # A short lease so the killed worker's claimed messages come back quickly.
    w = workers(
        broker_url, "--processes", "2", "--threads", "2", "--queues", queue, broker_options={"lease": 1500}
    )
    children = w.wait_children(2)
    sent = {send(broker, slow_record, n, 0.3, queue=queue).message_id for n in range(40)}
    wait_for(lambda: len(read_records(record_dir)) >= 4, message="first jobs done")
    victim = children[0]
    os.kill(victim, signal.SIGKILL)
    # The supervisor replaces the dead process.
    wait_for(lambda: victim not in w.children() and len(w.children()) == 2, message="a restarted worker")
    wait_for(lambda: ids_seen(record_dir) >= sent, timeout=120, message="every message after the kill")
    assert w.stop() == 0
    assert "exited with -9; restarting" in w.output()


def test_sigterm_exits_0_and_running_jobs_finish(broker, broker_url, queue, record_dir, workers):
    w = workers(
        broker_url, "--processes", "1", "--threads", "2", "--queues", queue, "--shutdown-timeout", "10000"
    )
    w.wait_children(1)
    first = send(broker, slow_record, "long", 1.5, queue=queue)
    wait_for(lambda: broker.get_queue_stats(queue).in_flight == 1, message="job started")
    started = time.monotonic()
    assert w.stop(timeout=30) == 0
    assert time.monotonic() - started < 12
    assert first.message_id in ids_seen(record_dir), "the running job finished before exit"
    assert broker.get_queue_stats(queue)[:3] == (0, 0, 0)


def test_unfinished_jobs_go_back_on_shutdown_timeout(broker, broker_url, queue, record_dir, workers):
    w = workers(
        broker_url, "--processes", "1", "--threads", "1", "--queues", queue, "--shutdown-timeout", "300"
    )
    w.wait_children(1)
    message = send(broker, slow_record, "too-long", 5, queue=queue)
    wait_for(lambda: broker.get_queue_stats(queue).in_flight == 1, message="job started")
    assert w.stop(timeout=30) == 0
    assert message.message_id not in ids_seen(record_dir)
    assert broker.get_queue_stats(queue).ready == 1, "the unfinished message is back in its queue"


def test_sighup_restarts_workers_gracefully(broker, broker_url, queue, record_dir, workers):
    w = workers(broker_url, "--processes", "1", "--threads", "2", "--queues", queue)
    before = w.wait_children(1)
    w.signal(signal.SIGHUP)
    wait_for(lambda: (c := w.children()) and c != before and len(c) == 1, message="new worker process")
    sent = {send(broker, record, n, queue=queue).message_id for n in range(10)}
    wait_for(lambda: ids_seen(record_dir) >= sent, message="work after SIGHUP")
    assert w.stop() == 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (readable until it is reaped)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _running_one_job(broker, broker_url, queue, workers, seconds: float, shutdown_timeout: int):
    """A one-process, one-thread runworkers running a ``seconds``-long job: (workers, message)."""
    w = workers(
        broker_url, "--processes", "1", "--threads", "1", "--queues", queue,
        "--shutdown-timeout", str(shutdown_timeout),
    )  # fmt: skip
    w.wait_children(1)
    job = send(broker, slow_record, "slow", seconds, queue=queue)
    wait_for(lambda: broker.get_queue_stats(queue).in_flight == 1, message="job started")
    return w, job


def _signal_and_see(w, signum: int, line: str) -> None:
    """Send ``signum`` to the supervisor and wait until it logs ``line``."""
    w.signal(signum)
    wait_for(lambda: line in w.output(), message=repr(line))


def _sighup_ignored_while_the_job_runs(w, job, record_dir) -> None:
    """Send SIGHUP while the supervisor waits for its worker process to finish ``job``: it
    is ignored, and the supervisor goes on waiting without spinning until the job is done."""
    before = _cpu_seconds(w.pid)
    _signal_and_see(w, signal.SIGHUP, "SIGHUP ignored")
    assert job.message_id not in ids_seen(record_dir), "the SIGHUP came while the job ran"
    wait_for(lambda: job.message_id in ids_seen(record_dir), message="the running job to finish")
    # Seconds of waiting, not of CPU: the wake-up socket was drained.
    assert _cpu_seconds(w.pid) - before < 0.5


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])  # the supervisor's own
def test_sigterm_during_a_sighup_restart_stops_instead(broker, broker_url, queue, record_dir, workers):
    w, job = _running_one_job(broker, broker_url, queue, workers, seconds=8, shutdown_timeout=20_000)
    _signal_and_see(w, signal.SIGHUP, "SIGHUP: restarting")
    # The old worker process is still finishing its job: the restart gives way at once,
    # not once the old processes have stopped and new ones started.
    _signal_and_see(w, signal.SIGTERM, "stopping worker processes")
    assert job.message_id not in ids_seen(record_dir), "the stop began while the job ran"
    assert w.process.wait(30) == 0
    assert job.message_id in ids_seen(record_dir), "the running job finished"
    assert w.output().count("started (pid") == 1, "no worker process was started after the SIGTERM"


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])
def test_a_second_sigterm_during_a_sighup_restart_forces(broker, broker_url, queue, record_dir, workers):
    w, job = _running_one_job(broker, broker_url, queue, workers, seconds=30, shutdown_timeout=60_000)
    _signal_and_see(w, signal.SIGHUP, "SIGHUP: restarting")
    # Not back to back: two of a kind pending at once are one signal to the process.
    _signal_and_see(w, signal.SIGTERM, "stopping worker processes")
    w.signal(signal.SIGTERM)
    # Not after the 30 s job: the second SIGTERM kills the worker processes at once.
    assert w.process.wait(15) == 1
    assert "forced stop" in w.output()
    assert job.message_id not in ids_seen(record_dir)


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])
def test_a_sighup_during_shutdown_is_ignored_without_spinning(broker, broker_url, queue, record_dir, workers):
    w, job = _running_one_job(broker, broker_url, queue, workers, seconds=6, shutdown_timeout=20_000)
    _signal_and_see(w, signal.SIGTERM, "stopping worker processes")
    _sighup_ignored_while_the_job_runs(w, job, record_dir)
    assert w.process.wait(30) == 0
    assert w.output().count("started (pid") == 1, "the SIGHUP restarted nothing"


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])
def test_a_sighup_during_a_sighup_restart_is_ignored_without_spinning(
    broker, broker_url, queue, record_dir, workers
):
    w, job = _running_one_job(broker, broker_url, queue, workers, seconds=8, shutdown_timeout=20_000)
    [old] = w.wait_children(1)
    _signal_and_see(w, signal.SIGHUP, "SIGHUP: restarting")
    _sighup_ignored_while_the_job_runs(w, job, record_dir)
    # The restart goes on: the old worker process finished the job, then one new one started.
    wait_for(lambda: old not in w.children(), message="the old worker process to exit")
    [new] = w.wait_children(1)
    assert pids_that_ran(record_dir, job) == {old}
    after = send(broker, record, "after the restart", queue=queue)
    wait_for(lambda: after.message_id in ids_seen(record_dir), message="work after the restart")
    assert pids_that_ran(record_dir, after) == {new}
    assert w.stop() == 0
    output = w.output()
    assert output.count("SIGHUP: restarting") == 1, "the second SIGHUP started no second restart"
    assert output.count("started (pid") == 2, "one worker process before the restart, one after"


def test_retries_reach_success_or_dead_letter(broker, broker_url, queue, record_dir, workers):
    ok = send(broker, flaky, "eventually", 2, queue=queue)
    bad = send(broker, always_fail, "never", queue=queue)
    w = workers(broker_url, "--processes", "1", "--threads", "2", "--queues", queue)
    wait_for(lambda: ok.message_id in ids_seen(record_dir), message="flaky job to succeed")
    row = wait_for(
        lambda: DeadLetter.objects.filter(message_id=bad.message_id).first(), message="dead letter"
    )
    assert row.exception_type == "ValueError" and row.retries == 2
    assert w.stop() == 0


def test_a_send_in_a_rolled_back_transaction_never_runs(broker, broker_url, queue, record_dir, workers):
    alias = broker_url.split("://")[1]

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic(using=alias):
        ghost = send(broker, record, "ghost", queue=queue)
        raise Rollback
    marker = send(broker, record, "marker", queue=queue)
    w = workers(broker_url, "--processes", "1", "--threads", "2", "--queues", queue)
    wait_for(lambda: marker.message_id in ids_seen(record_dir), message="marker")
    assert ghost.message_id not in ids_seen(record_dir)
    assert w.stop() == 0


def test_pid_file_log_file_and_banner(broker_url, queue, tmp_path, workers):
    pid_file = tmp_path / "workers.pid"
    log_file = tmp_path / "workers.log"
    w = workers(
        broker_url, "--processes", "1", "--threads", "1", "--queues", queue,
        "--pid-file", str(pid_file), "--log-file", str(log_file),
    )  # fmt: skip
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() == str(w.pid), message="pid file")
    wait_for(lambda: log_file.exists() and "worker process 0 started" in log_file.read_text(), message="log")
    assert w.stop() == 0
    assert not pid_file.exists()
    banner = w.output()
    assert f"queues {queue}" in banner and "1 processes x 1 threads" in banner


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])
def test_without_the_projects_logging_of_djqueue_runworkers_logs_info_to_stderr(broker_url, queue, workers):
    w = workers(broker_url, "--processes", "1", "--queues", queue, env={"DJQUEUE_TEST_LOGGING": "none"})
    wait_for(lambda: "INFO djqueue.worker: worker process 0 started" in w.output(), message="the start line")
    assert w.stop() == 0


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])
def test_runworkers_keeps_the_projects_logging_of_djqueue(broker, broker_url, queue, tmp_path, workers):
    # LOGGING sends djqueue's records to the project's file at WARNING: a team's Sentry or
    # JSON pipeline must get the worker's errors, and no INFO line it did not ask for.
    project_log = tmp_path / "project.log"
    env = {"DJQUEUE_TEST_LOGGING": f"djqueue:{project_log}", "DJQUEUE_LOG_LEVEL": "WARNING"}
    bad = send(broker, always_fail, "never", queue=queue)
    w = workers(broker_url, "--processes", "1", "--queues", queue, env=env)
    wait_for(lambda: DeadLetter.objects.filter(message_id=bad.message_id).exists(), message="dead letter")
    wait_for(
        lambda: project_log.exists() and f"dead-lettering {bad.message_id}" in project_log.read_text(),
        message="the dead-lettering line in the project's log",
    )
    assert w.stop() == 0
    assert "dead-lettering" not in w.output()
    assert "worker process 0 started" not in project_log.read_text() + w.output()


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])
def test_a_root_handler_for_errors_only_gets_them_and_stderr_still_shows_the_rest(
    broker, broker_url, queue, tmp_path, workers
):
    errors = tmp_path / "errors.log"
    bad = send(broker, always_fail, "never", queue=queue)
    env = {"DJQUEUE_TEST_LOGGING": f"root-errors:{errors}"}
    w = workers(broker_url, "--processes", "1", "--queues", queue, env=env)
    wait_for(
        lambda: errors.exists() and f"dead-lettering {bad.message_id}" in errors.read_text(),
        message="the dead-lettering error in the project's error log",
    )
    assert w.stop() == 0
    output = w.output()
    assert "INFO djqueue.worker: worker process 0 started" in output
    assert "WARNING djqueue.worker: always_fail('never') failed" in output
    assert "failed" not in errors.read_text().replace("dead-lettering", "")


def test_watch_restarts_workers_when_code_changes(broker_url, queue, tmp_path, record_dir, workers, broker):
    code = tmp_path / "code"
    code.mkdir()
    module = code / "module.py"
    module.write_text("VALUE = 1\n")
    w = workers(broker_url, "--processes", "1", "--threads", "1", "--queues", queue, "--watch", str(code))
    before = w.wait_children(1)
    wait_for(lambda: "started (pid" in w.output(), message="the worker consuming")
    module.write_text("VALUE = 2  # changed\n")
    wait_for(lambda: (c := w.children()) and c != before and len(c) == 1, message="a restarted worker")
    message = send(broker, record, "after reload", queue=queue)
    wait_for(lambda: message.message_id in ids_seen(record_dir), message="work after the reload")
    assert "code changed: restarting worker processes" in w.output()
    assert w.stop() == 0


PROBE_TASKS = """
from djqueue import actor
from tests.testapp.tasks import _record

VERSION = {version!r}


@actor(actor_name="reload_probe")
def reload_probe():
    _record("version " + VERSION)
"""


def _probe_project(tmp_path):
    """A settings module adding an app whose actor records its module's VERSION."""
    code = tmp_path / "code"
    (code / "reload_app").mkdir(parents=True)
    (code / "reload_app" / "__init__.py").write_text("")
    (code / "reload_app" / "tasks.py").write_text(PROBE_TASKS.format(version="one"))
    (code / "reload_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n\n"
        "INSTALLED_APPS = [*INSTALLED_APPS, 'reload_app']  # noqa: F405\n"
    )
    env = {"DJANGO_SETTINGS_MODULE": "reload_settings", "PYTHONPATH": f"{code}:{ROOT}"}
    return code, env


def _probe(broker, queue, record_dir, version):
    message = broker.enqueue(
        Message(queue_name=queue, actor_name="reload_probe", args=(), kwargs={}, options={})
    )
    wait_for(
        lambda: (
            (message.message_id, f"version {version}") in {(m, v) for m, _, v in read_records(record_dir)}
        ),
        message=f"the probe to run version {version}",
    )


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])  # the same on every database
@pytest.mark.parametrize("trigger", ["sighup", "watch"])
def test_restarted_workers_run_the_new_code(
    broker, broker_url, queue, tmp_path, record_dir, workers, trigger
):
    code, env = _probe_project(tmp_path)
    watch = ["--watch", str(code)] if trigger == "watch" else []
    w = workers(broker_url, "--processes", "1", "--threads", "1", "--queues", queue, *watch, env=env)
    before = w.wait_children(1)
    _probe(broker, queue, record_dir, "one")
    # A different length too: a .pyc is reused when its source's size and mtime second match.
    (code / "reload_app" / "tasks.py").write_text(PROBE_TASKS.format(version="two (edited)"))
    if trigger == "sighup":
        w.signal(signal.SIGHUP)
    wait_for(lambda: (c := w.children()) and c != before and len(c) == 1, message="a restarted worker")
    _probe(broker, queue, record_dir, "two (edited)")
    # A worker that dies now is replaced by one running the new code too.
    (victim,) = w.children()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (c := w.children()) and victim not in c and len(c) == 1, message="a replaced worker")
    _probe(broker, queue, record_dir, "two (edited)")
    assert w.stop() == 0


@pytest.mark.parametrize("broker_url", ["db://default"], ids=["sqlite"])
def test_worker_processes_are_forked_from_the_set_up_supervisor(broker_url, queue, workers):
    w = workers(broker_url, "--processes", "2", "--threads", "1", "--queues", queue)
    children = w.wait_children(2)
    wait_for(lambda: w.output().count("started (pid") == 2, message="two worker processes consuming")
    supervisor = Path(f"/proc/{w.pid}/cmdline").read_bytes()
    # A forked process keeps its parent's command line; a spawned one runs spawn_main.
    assert all(Path(f"/proc/{pid}/cmdline").read_bytes() == supervisor for pid in children)
    assert w.stop() == 0


def test_a_worker_still_booting_stops_when_its_supervisor_is_killed(broker_url, queue, workers):
    w = workers(
        broker_url,
        "--processes",
        "1",
        "--threads",
        "1",
        "--queues",
        queue,
        env={"DJQUEUE_TEST_SLOW_BOOT": "3"},
    )
    [child] = w.wait_children(1)
    os.kill(w.pid, signal.SIGKILL)
    w.process.wait(10)
    try:
        # It boots for 3 s, then notices within a second that it was orphaned.
        wait_for(lambda: _gone(child), timeout=15, message="the orphaned worker process to stop")
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    ("broker_url", "tables"),
    [
        ("db://default", "djqueue_deadletter, djqueue_queuedmessage, djqueue_throughputminute"),
        ("redis://127.0.0.1:6379/15", "djqueue_deadletter, djqueue_throughputminute, djqueue_worker"),
    ],
    ids=["database-broker", "redis"],
)
@pytest.mark.parametrize("command", ["runworkers", "runscheduler"])
def test_without_migrate_the_commands_stop_and_say_so(broker_url, tables, command, tmp_path):
    # A fresh project's first mistake: workers would only repeat "no such table" forever.
    result = run_django(
        command, DJQUEUE_TEST_SQLITE=str(tmp_path / "never-migrated.sqlite3"), DJQUEUE_BROKER_URL=broker_url
    )
    assert result.returncode == 1, result.stdout + result.stderr
    if command == "runworkers":
        assert f"database 'default' has no table {tables}" in result.stderr
    else:
        assert "database 'default' has no table djqueue_" in result.stderr
        assert ("djqueue_queuedmessage" in result.stderr) == broker_url.startswith("db://")
        assert "djqueue_schedulerun" in result.stderr
    assert "Run `python manage.py migrate` first." in result.stderr
    assert "Traceback" not in result.stderr and "started" not in result.stdout
