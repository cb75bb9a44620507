"""Dead letters, results and schedule runs as rows, plus the database broker's queue table."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class DeadLetterQuerySet(models.QuerySet["DeadLetter"]):
    def dead(self) -> DeadLetterQuerySet:
        return self.filter(status=DeadLetter.Status.DEAD)


class DeadLetter(models.Model):
    """A message that failed for good: retries exhausted, ``throws``, or malformed.

    The indexes serve the admin on large tables: each list filter (status, actor,
    queue) is a prefix of an index that also returns rows newest first.
    """

    class Status(models.TextChoices):
        DEAD = "dead", "dead"
        RETRIED = "retried", "retried"
        DISCARDED = "discarded", "discarded"

    message_id = models.CharField(max_length=64, unique=True)
    queue_name = models.CharField(max_length=100)
    actor_name = models.CharField(max_length=255)
    message = models.JSONField(default=dict, help_text="The whole original message.")
    raw_payload = models.TextField(blank=True, help_text="The bytes received, when they did not decode.")
    args = models.JSONField(default=list)
    kwargs = models.JSONField(default=dict)
    options = models.JSONField(default=dict)
    exception_type = models.CharField(max_length=255, blank=True)
    exception_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    retries = models.PositiveIntegerField(default=0)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(default=timezone.now, db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DEAD)
    retried_message_id = models.CharField(max_length=64, blank=True)
    retried_at = models.DateTimeField(null=True, blank=True)

    objects = DeadLetterQuerySet.as_manager()

    class Meta:
        ordering = ["-failed_at"]
        permissions = [("retry_deadletter", "Can retry dead letters")]
        indexes = [
            models.Index(fields=["status", "-failed_at"], name="djqueue_dl_status_failed"),
            models.Index(fields=["actor_name", "-failed_at"], name="djqueue_dl_actor_failed"),
            models.Index(fields=["queue_name", "-failed_at"], name="djqueue_dl_queue_failed"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name or '(malformed)'} {self.message_id}"

    @property
    def is_malformed(self) -> bool:
        """The payload did not decode into a message, so there is nothing to re-send."""
        return bool(self.raw_payload) or not self.actor_name


class TaskResult(models.Model):
    """The return value (or final failure) of a message whose result is kept.

    Kept for actors with ``store_results=True`` and for the messages that ``group`` and
    ``pipeline`` read. ``group_id`` is set on the members of a group that has completion
    callbacks: the group is complete when it has as many succeeded rows as members.
    """

    class Status(models.TextChoices):
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"

    message_id = models.CharField(max_length=64, unique=True)
    actor_name = models.CharField(max_length=255)
    queue_name = models.CharField(max_length=100)
    status = models.CharField(max_length=16, choices=Status.choices)
    result = models.JSONField(null=True, blank=True)
    exception_type = models.CharField(max_length=255, blank=True)
    exception = models.TextField(blank=True)
    group_id = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(default=timezone.now, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-finished_at"]
        indexes = [
            models.Index(fields=["actor_name", "-finished_at"], name="djqueue_tr_actor_finished"),
            models.Index(fields=["status", "-finished_at"], name="djqueue_tr_status_finished"),
            models.Index(
                fields=["group_id", "status"], name="djqueue_tr_group", condition=~models.Q(group_id="")
            ),
        ]

    def __str__(self) -> str:
        return f"{self.actor_name} {self.message_id} {self.status}"


class ScheduleRun(models.Model):
    """One firing of a crontab entry: its claim by a scheduler, and the message it enqueued.

    Unique per (name, fire_time): a scheduler fires a tick by inserting this row, so of
    several schedulers running side by side exactly one wins. ``fire_time`` is the
    scheduled instant; ``enqueued_at`` when the message was sent. The scheduler keeps a
    week of rows and always each name's latest, which tells it what it missed while down.
    """

    name = models.CharField(max_length=200, help_text="The key of the entry in DJQUEUE['CRONTABS'].")
    fire_time = models.DateTimeField(help_text="The scheduled time of this tick.")
    message_id = models.CharField(max_length=64, blank=True, help_text="The enqueued message.")
    enqueued_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-fire_time"]
        constraints = [models.UniqueConstraint(fields=["name", "fire_time"], name="djqueue_schedulerun_once")]
        # The unique constraint's index serves per-name lookups; this one the admin's
        # newest-first list and the pruning of old rows.
        indexes = [models.Index(fields=["-fire_time"], name="djqueue_sr_fire_time")]

    def __str__(self) -> str:
        return f"{self.name} @ {self.fire_time.isoformat()}"


class QueuedMessage(models.Model):
    """A message held by the database broker (``db://``). Times are ms since the epoch.

    ``available_at`` is when the row may next be claimed: its eta while it waits, and
    the end of its lease while a worker holds it, so one indexed range scan finds both
    new and abandoned messages. ``lease_owner`` names the consumer holding the row (None
    while it waits); ``delivery_count`` counts the claims (a requeue takes one back).
    The SQL that changes these rows is in djqueue/brokers/database_sql.py.
    """

    id = models.BigAutoField(primary_key=True)
    queue_name = models.CharField(max_length=100)
    message_id = models.CharField(max_length=64, db_index=True)
    priority = models.IntegerField(default=0)
    available_at = models.BigIntegerField()
    payload = models.BinaryField()
    lease_owner = models.CharField(max_length=64, null=True, blank=True)
    delivery_count = models.PositiveIntegerField(default=0)
    created_at = models.BigIntegerField()

    class Meta:
        # The claim reads this index in order (priority, eta, age) and stops at its
        # LIMIT. Leases are renewed, acked and given back by primary key, so
        # ``lease_owner`` needs no index of its own: every index slows every claim.
        indexes = [
            models.Index(fields=["queue_name", "-priority", "available_at", "id"], name="djqueue_qm_claim"),
        ]

    def __str__(self) -> str:
        return f"{self.queue_name}:{self.message_id}"


class RateLimitState(models.Model):
    """The state of one rate limiter key, for RATE_LIMIT_BACKEND = "db".

    ``state`` is JSON owned by djqueue/rate_limits/state.py; ``expires_at`` (ms since the
    epoch) is when it stops mattering, after which the row may be deleted.
    """

    key = models.CharField(max_length=255, primary_key=True)
    state = models.JSONField(null=True, blank=True)
    expires_at = models.BigIntegerField(db_index=True)

    def __str__(self) -> str:
        return self.key


class UniqueJobKey(models.Model):
    """A unique job's key, held by the message that claimed it until ``expires_at`` (ms
    since the epoch) or until that message is acked, dead-lettered or cancelled."""

    key = models.CharField(max_length=255, primary_key=True)
    message_id = models.CharField(max_length=64, db_index=True)
    expires_at = models.BigIntegerField(db_index=True)

    def __str__(self) -> str:
        return f"{self.key} -> {self.message_id}"


class WorkerHeartbeat(models.Model):
    """One live worker process, upserted every few seconds by the ``Heartbeats``
    middleware and deleted when the process stops. A row whose ``last_seen`` is old
    belongs to a process that died without saying goodbye (SIGKILL, out of memory)."""

    worker_id = models.CharField(max_length=255, unique=True, help_text="host:pid")
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    queues = models.JSONField(default=list)
    threads = models.PositiveIntegerField(default=0)
    in_progress = models.PositiveIntegerField(default=0)
    processed = models.PositiveBigIntegerField(default=0, help_text="messages run since start")
    failed = models.PositiveBigIntegerField(default=0, help_text="of which raised or were dead-lettered")
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["hostname", "pid"]

    def __str__(self) -> str:
        return self.worker_id


class ThroughputMinute(models.Model):
    """Messages processed and failed in one minute, over every worker process.

    Workers count in memory and add their counts here every few seconds with one
    ``UPDATE ... SET processed = processed + n``; the dashboard charts the last hour.
    """

    minute = models.DateTimeField(unique=True, help_text="the start of the minute (UTC)")
    processed = models.PositiveBigIntegerField(default=0)
    failed = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-minute"]

    def __str__(self) -> str:
        return f"{self.minute.isoformat()}: {self.processed} processed, {self.failed} failed"


class DjangoTaskResult(models.Model):
    """The state of one ``django.tasks`` task run by ``djqueue.backends.DjqueueTaskBackend``.

    Django's task API has states (ready, running) and details (arguments, every attempt's
    traceback, worker ids) that a djqueue result does not keep, so tasks have rows of
    their own, keyed by the id of the message that carries the task.
    """

    class Status(models.TextChoices):
        READY = "READY", "ready"
        RUNNING = "RUNNING", "running"
        FAILED = "FAILED", "failed"
        SUCCESSFUL = "SUCCESSFUL", "successful"

    id = models.CharField(max_length=64, primary_key=True, help_text="the message id")
    task_path = models.CharField(max_length=255)
    backend = models.CharField(max_length=100)
    queue_name = models.CharField(max_length=100)
    priority = models.IntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.READY)
    args = models.JSONField(default=list)
    kwargs = models.JSONField(default=dict)
    run_after = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    last_attempted_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker_ids = models.JSONField(default=list)
    errors = models.JSONField(default=list, help_text="[{exception_class_path, traceback}] per failure")
    return_value = models.JSONField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-enqueued_at"]

    def __str__(self) -> str:
        return f"{self.task_path} {self.id} {self.status}"
