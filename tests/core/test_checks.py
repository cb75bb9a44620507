from __future__ import annotations

import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from djqueue.checks import check_settings

ROOT = Path(__file__).resolve().parents[2]


def ids(errors) -> list[str]:
    return [e.id for e in errors]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("kafka://localhost", "djqueue.E001"),
        ("not a url", "djqueue.E002"),
        ("redis://localhost:notaport/0", "djqueue.E002"),
        ("db://nosuchalias", "djqueue.E002"),
    ],
)
def test_bad_broker_url(url, expected):
    with override_settings(DJQUEUE={"BROKER_URL": url}):
        errors = check_settings()
    assert expected in ids(errors)
    assert "BROKER_URL" in errors[0].msg


def test_password_is_not_shown_in_errors():
    with override_settings(DJQUEUE={"BROKER_URL": "kafka://user:s3cret@localhost"}):
        errors = check_settings()
    assert "s3cret" not in errors[0].msg
    assert "***" in errors[0].msg


def test_unknown_middleware():
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", "MIDDLEWARE": ["djqueue.middleware.nope.Nope"]}):
        assert ids(check_settings()) == ["djqueue.E003"]


@pytest.mark.parametrize(
    "setting",
    [
        {"RESULT_TTL": -1},
        {"MAX_MESSAGE_SIZE": "big"},
        {"BROKER_OPTIONS": []},
        {"TASKS_MODULE": "my tasks"},
        {"ENCODER": "yaml"},
        {"RESULT_BACKEND": "memcached://x"},
    ],
)
def test_bad_values(setting):
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", **setting}):
        errors = check_settings()
    assert ids(errors) == ["djqueue.E004"]
    assert next(iter(setting)) in errors[0].msg


def test_hints_fit_the_setting():
    def hint(setting):
        with override_settings(DJQUEUE={"BROKER_URL": "stub://", **setting}):
            (error,) = check_settings()
        assert error.id == "djqueue.E004"
        return error.hint

    # Only times are in milliseconds.
    assert "milliseconds" not in hint({"MAX_DELIVERIES": 0})
    assert "deliveries" in hint({"MAX_DELIVERIES": 0})
    assert "milliseconds" not in hint({"MAX_MESSAGE_SIZE": "big"})
    assert "bytes" in hint({"MAX_MESSAGE_SIZE": "big"})
    assert "milliseconds" in hint({"SHUTDOWN_TIMEOUT": -1})
    # A bare "redis" is shown the URL it needs.
    assert "'redis://localhost:6379/0'" in hint({"RESULT_BACKEND": "redis"})
    assert "'redis://localhost:6379/0'" in hint({"RATE_LIMIT_BACKEND": "redis"})


def test_typo_and_pickle_warnings():
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", "BROKER_ULR": "x", "ENCODER": "pickle"}):
        assert sorted(ids(check_settings())) == ["djqueue.W001", "djqueue.W002"]


def test_defaults_are_clean():
    with override_settings(DJQUEUE={"BROKER_URL": "stub://"}):
        assert check_settings() == []


@pytest.mark.parametrize("value", ["redis://:s3cret@localhost:6379/0", ["stub://"]])
def test_djqueue_that_is_not_a_dict_is_an_error(value):
    with override_settings(DJQUEUE=value):
        errors = check_settings()
    assert ids(errors) == ["djqueue.E006"]
    assert "settings.DJQUEUE is " in errors[0].msg and "not a dict" in errors[0].msg
    assert "DJQUEUE = {'BROKER_URL': " in errors[0].hint
    assert "s3cret" not in errors[0].msg + errors[0].hint
    with override_settings(DJQUEUE={"BROKER_URL": "stub://"}):
        assert check_settings() == []


def test_djqueue_settings_outside_the_dict_are_warned_about():
    with override_settings(DJQUEUE={"BROKER_URL": "stub://"}, DJQUEUE_BROKER_URL="redis://:s3cret@h:6379/0"):
        (warning,) = check_settings()
    assert warning.id == "djqueue.W004"
    assert "settings.DJQUEUE_BROKER_URL" in warning.msg and "environment variable" in warning.msg
    assert "DJQUEUE = {'BROKER_URL': ...}" in warning.hint
    assert "s3cret" not in warning.msg + warning.hint
    with override_settings(DJQUEUE={"BROKER_URL": "stub://"}, DJQUEUE_RESULT_BACKEND="db", DJQUEUE_FOO=1):
        errors = check_settings()
    assert ids(errors) == ["djqueue.W004", "djqueue.W004"]
    assert "settings.DJQUEUE_FOO" in errors[0].msg and "SILENCED_SYSTEM_CHECKS" in errors[0].hint
    assert "DJQUEUE = {'RESULT_BACKEND': ...}" in errors[1].hint
    # A helper variable whose value the DJQUEUE dict uses is fine.
    url = "stub://"
    with override_settings(DJQUEUE={"BROKER_URL": url}, DJQUEUE_BROKER_URL=url):
        assert check_settings() == []


def test_empty_rabbitmq_vhost_is_an_error():
    with override_settings(DJQUEUE={"BROKER_URL": "amqp://guest:s3cret@127.0.0.1:5672//"}):
        errors = check_settings()
    assert ids(errors) == ["djqueue.E007"]
    assert "empty RabbitMQ virtual host" in errors[0].msg
    assert "'amqp://guest:***@127.0.0.1:5672/%2F'" in errors[0].hint
    assert "s3cret" not in errors[0].msg + errors[0].hint
    with override_settings(DJQUEUE={"BROKER_URL": "amqp://a:5672/%2F;amqp://b:5672//?heartbeat=30"}):
        errors = check_settings()
    assert ids(errors) == ["djqueue.E007"] and "amqp://b:5672//" in errors[0].msg
    for url in ("amqp://h:5672/%2F", "amqp://h:5672/", "amqp://h:5672", "amqps://h/shop"):
        with override_settings(DJQUEUE={"BROKER_URL": url}):
            assert check_settings() == [], url


@contextmanager
def databases(**aliases):
    """settings.DATABASES with these aliases added or replaced (read by the checks only)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting DATABASES", UserWarning)
        with override_settings(DATABASES={**settings.DATABASES, **aliases}):
            yield


def sqlite(**options):
    config = {"ENGINE": "django.db.backends.sqlite3", "NAME": "unused.sqlite3"}
    return {**config, "OPTIONS": options} if options else config


def test_sqlite_broker_without_immediate_transactions_is_warned_about():
    # A fresh project's database: no OPTIONS; or some options, but not this one.
    for config in (sqlite(), sqlite(timeout=20), sqlite(transaction_mode="DEFERRED")):
        with databases(default=config), override_settings(DJQUEUE={"BROKER_URL": "db://default"}):
            (warning,) = check_settings()
        assert warning.id == "djqueue.W003"
        assert "DATABASES['default'] is a SQLite database" in warning.msg
        assert "database broker's queue (db://default)" in warning.msg
        assert "database is locked" in warning.msg
        assert (
            "['OPTIONS'] = {'transaction_mode': 'IMMEDIATE', 'timeout': 20, 'init_command':" in warning.hint
        )
    # A URL that also fails E002 (a query string) is named with its secrets masked.
    with (
        databases(default=sqlite()),
        override_settings(DJQUEUE={"BROKER_URL": "db://default?password=s3cret"}),
    ):
        messages = [error.msg for error in check_settings()]
    assert any("database broker's queue (db://default?password=***)" in msg for msg in messages), messages
    assert not any("s3cret" in msg for msg in messages), messages
    for config in (
        sqlite(transaction_mode="IMMEDIATE", timeout=20),
        sqlite(transaction_mode="immediate"),
        sqlite(transaction_mode="EXCLUSIVE"),
    ):
        with databases(default=config), override_settings(DJQUEUE={"BROKER_URL": "db://default"}):
            assert check_settings() == [], config
    with override_settings(DJQUEUE={"BROKER_URL": "db://postgres"}):
        assert check_settings() == []  # PostgreSQL needs no such option


def test_sqlite_for_dead_letters_and_results_is_warned_about_whatever_the_broker():
    # Worker processes write dead letters and results to the database even when the
    # broker is Redis; the in-memory stub broker has no worker processes.
    with databases(default=sqlite()):
        with override_settings(DJQUEUE={"BROKER_URL": "redis://localhost:6379/0"}):
            (warning,) = check_settings()
        assert warning.id == "djqueue.W003"
        assert "DATABASES['default']" in warning.msg
        assert "dead letters and results (RESULT_BACKEND 'db')" in warning.msg
        with override_settings(DJQUEUE={"BROKER_URL": "redis://h/0", "RESULT_BACKEND": "redis://h/1"}):
            (warning,) = check_settings()
        assert "dead letters, which" in warning.msg
        with override_settings(DJQUEUE={"BROKER_URL": "stub://"}):
            assert check_settings() == []
    with override_settings(DJQUEUE={"BROKER_URL": "redis://localhost:6379/0"}):
        assert check_settings() == []  # the test settings' SQLite has the options


def test_manage_py_check_fails_at_startup_for_a_bad_url():
    env = {**os.environ, "DJQUEUE_BROKER_URL": "kafka://localhost:9092"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "djqueue.E001" in result.stderr


def test_environment_variable_is_the_fallback(monkeypatch):
    from djqueue import conf

    monkeypatch.setenv("DJQUEUE_BROKER_URL", "redis://example:6379/1")
    with override_settings(DJQUEUE={}):
        assert conf.get("BROKER_URL") == "redis://example:6379/1"
    monkeypatch.delenv("DJQUEUE_BROKER_URL")
    with override_settings(DJQUEUE={}):
        assert conf.get("BROKER_URL") == "db://default"


@pytest.mark.parametrize("auto_field", ["django.db.models.AutoField", "django.db.models.BigAutoField"])
def test_migrations_are_complete(auto_field):
    code = (
        "import django, sys; from django.conf import settings; "
        "from django.core.management import call_command; "
        "settings.configure("
        "INSTALLED_APPS=['django.contrib.contenttypes', 'django.contrib.auth', 'djqueue'], "
        f"DATABASES={{'default': {{'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}}}}, "
        f"DEFAULT_AUTO_FIELD={auto_field!r}, DJQUEUE={{'BROKER_URL': 'stub://'}}); django.setup(); "
        "call_command('makemigrations', 'djqueue', check=True, dry_run=True)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mask_url():
    from djqueue.brokers import mask_url

    assert mask_url("amqp://guest:guest@localhost:5672/%2F") == "amqp://guest:***@localhost:5672/%2F"
    assert mask_url("redis://:pw@h:1/0;redis://:pw2@h2:1/0") == "redis://:***@h:1/0;redis://:***@h2:1/0"
    assert mask_url("db://default") == "db://default"
    # redis-py also takes a password, and a TLS key's, from the query string.
    assert (
        mask_url("redis://h:1/0?password=s3cret&socket_timeout=5")
        == "redis://h:1/0?password=***&socket_timeout=5"
    )
    assert mask_url("rediss://h/0?ssl_password=k%2Fy&db=2") == "rediss://h/0?ssl_password=***&db=2"
