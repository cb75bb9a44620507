"""djqueue's admin screens: dead letters (with Retry), results, and schedule runs."""

from __future__ import annotations

from .dead_letters import DeadLetterAdmin
from .results import TaskResultAdmin

__all__ = ["DeadLetterAdmin", "TaskResultAdmin"]

from ..scheduling import admin as _scheduling_admin  # noqa: F401 - registers the schedule screens
