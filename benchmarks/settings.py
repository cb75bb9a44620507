"""Django settings for the benchmark workers and clients (djqueue and django-tasks-db).

``BENCH_BROKER`` picks the broker: ``redis``, ``rabbitmq``, ``postgres`` (the database
broker on the ``djqueue_bench`` PostgreSQL database) or ``sqlite`` (the database broker
on a SQLite file under ``benchmarks/.work/``). Nothing here touches the test databases.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

WORK_DIR = Path(os.environ.get("BENCH_WORK_DIR", Path(__file__).resolve().parent / ".work"))
BROKER = os.environ.get("BENCH_BROKER", "redis")
SQLITE_PATH = os.environ.get("BENCH_SQLITE_PATH", str(WORK_DIR / "bench.sqlite3"))
PG_NAME = os.environ.get("BENCH_PG_NAME", "djqueue_bench")

SECRET_KEY = "benchmarks-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "djqueue", "benchmarks.djapp"]
# Only django-tasks' own processes (and migrate) load it, so it weighs on nobody else's
# memory; djqueue-only runs do without it installed.
WITH_DJANGO_TASKS = os.environ.get("BENCH_SYSTEM") == "django-tasks" or (
    os.environ.get("BENCH_MIGRATE") and importlib.util.find_spec("django_tasks_db") is not None
)
if WITH_DJANGO_TASKS:
    INSTALLED_APPS += ["django_tasks", "django_tasks_db"]
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []}}
if os.environ.get("BENCH_SYSTEM") == "dramatiq+django":
    # A Django project that runs Dramatiq: Django's own apps, not djqueue (whose actors
    # would also declare the benchmark's queue on RabbitMQ, with other arguments).
    INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]

SQLITE = {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": SQLITE_PATH,
    "OPTIONS": {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    },
}
POSTGRES = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": PG_NAME,
    "USER": os.environ.get("BENCH_PG_USER", "postgres"),
    "PASSWORD": os.environ.get("BENCH_PG_PASSWORD", os.environ.get("DJQUEUE_TEST_PG_PASSWORD", "")),
    "HOST": os.environ.get("BENCH_PG_HOST", "127.0.0.1"),
    "PORT": os.environ.get("BENCH_PG_PORT", "5432"),
}
DATABASES = {"default": POSTGRES if BROKER == "postgres" else SQLITE}

BROKER_URLS = {
    "redis": os.environ.get("BENCH_DJQUEUE_REDIS_URL", "redis://127.0.0.1:6379/11"),
    "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    "postgres": "db://default",
    "sqlite": "db://default",
}
DJQUEUE = {"BROKER_URL": BROKER_URLS[BROKER], "SHUTDOWN_TIMEOUT": 10_000}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
