"""Settings for the test suite.

Two databases: "default" is a SQLite file and "postgres" a PostgreSQL database on
127.0.0.1, so the database broker is tested on both (``db://default``,
``db://postgres``) in one run. Worker processes started by the tests use the same
settings, pointed at the test databases through the environment.
"""

import json
import os
import tempfile

RUN_ID = os.environ.setdefault("DJQUEUE_TEST_RUN_ID", str(os.getpid()))
SQLITE_PATH = os.environ.get(
    "DJQUEUE_TEST_SQLITE", os.path.join(tempfile.gettempdir(), f"djqueue-test-{RUN_ID}.sqlite3")
)
PG_NAME = os.environ.get("DJQUEUE_TEST_PG_NAME", f"djqueue_{RUN_ID}")

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "djqueue",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": SQLITE_PATH,
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
        "TEST": {"NAME": SQLITE_PATH},
    },
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": PG_NAME,
        "USER": os.environ.get("DJQUEUE_TEST_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("DJQUEUE_TEST_PG_PASSWORD", ""),
        "HOST": os.environ.get("DJQUEUE_TEST_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("DJQUEUE_TEST_PG_PORT", "5432"),
        "TEST": {"NAME": PG_NAME},
    },
}

DJQUEUE = {
    "BROKER_URL": os.environ.get("DJQUEUE_BROKER_URL", "stub://"),
    "BROKER_OPTIONS": json.loads(os.environ.get("DJQUEUE_TEST_BROKER_OPTIONS", "{}")),
    "SHUTDOWN_TIMEOUT": 10_000,
}
if os.environ.get("DJQUEUE_TEST_SLOW_BOOT"):
    from djqueue.middleware import DEFAULT_MIDDLEWARE

    # Worker processes that take this many seconds to boot (see tests/testapp/middleware.py).
    DJQUEUE["MIDDLEWARE"] = [*DEFAULT_MIDDLEWARE, "tests.testapp.middleware.SlowBoot"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "djqueue": {"handlers": ["console"], "level": os.environ.get("DJQUEUE_LOG_LEVEL", "WARNING")}
    },
}
# The tests of runworkers' own logging: a project that leaves djqueue's logger alone, one
# that sends its records to a file of its own, and one whose root logger keeps only
# errors (in a file, as a Sentry handler would).
_TEST_LOGGING = os.environ.get("DJQUEUE_TEST_LOGGING", "")
if _TEST_LOGGING == "none":
    LOGGING["loggers"] = {}
elif _TEST_LOGGING:
    _kind, _, _path = _TEST_LOGGING.rpartition(":")
    LOGGING["handlers"]["file"] = {"class": "logging.FileHandler", "filename": _path}
    if _kind == "root-errors":
        LOGGING["handlers"]["file"]["level"] = "ERROR"
        LOGGING["loggers"] = {}
        LOGGING["root"] = {"handlers": ["file"]}
    else:
        LOGGING["loggers"]["djqueue"]["handlers"] = ["file"]
