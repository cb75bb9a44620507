from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_typo_and_pickle_warnings():
    with override_settings(DJQUEUE={"BROKER_URL": "stub://", "BROKER_ULR": "x", "ENCODER": "pickle"}):
        assert sorted(ids(check_settings())) == ["djqueue.W001", "djqueue.W002"]


def test_defaults_are_clean():
    with override_settings(DJQUEUE={"BROKER_URL": "stub://"}):
        assert check_settings() == []


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
