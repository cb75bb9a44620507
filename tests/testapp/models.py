from django.db import models


class Execution(models.Model):
    """One run of a test actor, written by the actor so tests can count runs."""

    message_id = models.CharField(max_length=64, db_index=True)
    actor_name = models.CharField(max_length=255)
    value = models.JSONField(null=True)
    pid = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
