"""Dead letters, results and schedule runs as rows, plus the database broker's queue table."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class DeadLetterQuerySet(models.QuerySet["DeadLetter"]):
    def dead(self) -> DeadLetterQuerySet:
        return self.filter(status=DeadLetter.Status.DEAD)


class DeadLetter(models.Model):
    """A message that failed for good: retries exhausted, ``throws``, or malformed."""

    class Status(models.TextChoices):
        DEAD = "dead", "dead"
        RETRIED = "retried", "retried"
        DISCARDED = "discarded", "discarded"

    message_id = models.CharField(max_length=64, unique=True)
    queue_name = models.CharField(max_length=100, db_index=True)
    actor_name = models.CharField(max_length=255, db_index=True)
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
        indexes = [models.Index(fields=["status", "-failed_at"], name="djqueue_dl_status_failed")]

    def __str__(self) -> str:
        return f"{self.actor_name or '(malformed)'} {self.message_id}"


class TaskResult(models.Model):
    """The return value (or final failure) of an actor with ``store_results=True``."""

    class Status(models.TextChoices):
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"

    message_id = models.CharField(max_length=64, unique=True)
    actor_name = models.CharField(max_length=255, db_index=True)
    queue_name = models.CharField(max_length=100)
    status = models.CharField(max_length=16, choices=Status.choices)
    result = models.JSONField(null=True, blank=True)
    exception_type = models.CharField(max_length=255, blank=True)
    exception = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(default=timezone.now, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-finished_at"]

    def __str__(self) -> str:
        return f"{self.actor_name} {self.message_id} {self.status}"


class ScheduleRun(models.Model):
    """One firing of a crontab; unique per (name, fire_time) so each tick fires once."""

    name = models.CharField(max_length=200)
    fire_time = models.DateTimeField()
    message_id = models.CharField(max_length=64, blank=True)
    enqueued_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-fire_time"]
        constraints = [models.UniqueConstraint(fields=["name", "fire_time"], name="djqueue_schedulerun_once")]

    def __str__(self) -> str:
        return f"{self.name} @ {self.fire_time.isoformat()}"


class QueuedMessage(models.Model):
    """A message held by the database broker (``db://``). Times are ms since the epoch.

    ``available_at`` is when the row may next be claimed: its eta while it waits, and
    the end of its lease while a worker holds it, so one indexed range scan finds both
    new and abandoned messages.
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
        indexes = [
            models.Index(fields=["queue_name", "-priority", "available_at"], name="djqueue_qm_claim"),
            models.Index(fields=["lease_owner"], name="djqueue_qm_lease_owner"),
        ]

    def __str__(self) -> str:
        return f"{self.queue_name}:{self.message_id}"
