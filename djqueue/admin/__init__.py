"""djqueue's admin screens: dead letters (with Retry), results, django.tasks results, and
schedule runs."""

from __future__ import annotations

from .dead_letters import DeadLetterAdmin
from .django_tasks import DjangoTaskResultAdmin
from .results import TaskResultAdmin

__all__ = ["DeadLetterAdmin", "DjangoTaskResultAdmin", "TaskResultAdmin"]

from ..scheduling import admin as _scheduling_admin  # noqa: F401 - registers the schedule screens
