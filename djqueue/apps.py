from __future__ import annotations

import logging
from importlib import import_module
from importlib.util import find_spec

from django.apps import AppConfig, apps
from django.conf import settings

logger = logging.getLogger("djqueue")


class DjqueueConfig(AppConfig):
    name = "djqueue"
    verbose_name = "Background jobs"
    # Fixed here so the migrations do not depend on the project's DEFAULT_AUTO_FIELD.
    default_auto_field = "django.db.models.BigAutoField"
    startup_error: Exception | None = None

    def ready(self) -> None:
        from . import checks, conf  # noqa: F401 - registers the system checks
        from .brokers import get_broker
        from .errors import ConfigurationError

        if conf.get("CRONTABS"):
            # Registers the crontab checks. Only then: they import croniter and dateutil,
            # about 1 MB in every process, and without crontabs there is nothing to check.
            from .scheduling import checks as scheduling_checks  # noqa: F401

        try:
            get_broker()
        except (ConfigurationError, ImportError, ValueError, TypeError) as e:
            # Reported by the djqueue.E00x checks, which every command runs before
            # it starts; raising here would hide them behind a traceback.
            self.startup_error = e
            logger.error("djqueue broker not built: %s", e)
            return
        autodiscover()
        if conf.get("CRONTABS"):
            from .scheduling.queues import declare_at_startup

            declare_at_startup()  # the entries' queues are the project's too
        task_backends = getattr(settings, "TASKS", {}).values()
        if any(str(params.get("BACKEND", "")).startswith("djqueue.") for params in task_backends):
            from .backends import connect_task_backends

            connect_task_backends()  # declares the actor that runs django.tasks tasks


def autodiscover() -> list[str]:
    """Import ``<app>.<TASKS_MODULE>`` for every installed app that has one.

    An error raised while importing an existing tasks module propagates: a broken
    tasks module must fail loudly at start-up, not leave actors silently missing.
    """
    from . import conf

    module_name = conf.get("TASKS_MODULE")
    found = []
    for app_config in apps.get_app_configs():
        dotted = f"{app_config.name}.{module_name}"
        try:
            spec = find_spec(dotted)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        import_module(dotted)
        found.append(dotted)
    logger.debug("djqueue discovered tasks modules: %s", found)
    return found
