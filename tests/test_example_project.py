"""The example project: its checks, its migrations and the README's first command."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: int = 120):
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("DJQUEUE_") and k != "DJANGO_SETTINGS_MODULE"
    }
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_check_deploy_passes_for_production_settings():
    result = run(
        "manage.py",
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env={
            "DJANGO_SETTINGS_MODULE": "example_project.settings_production",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_migrations_are_complete():
    result = run("manage.py", "makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_readme_demo_runs_on_a_fresh_sqlite_database(tmp_path):
    # A copy of the project, so the demo creates its own db.sqlite3 as a newcomer's would.
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", "*.sqlite3*", "__pycache__", ".tox"))
    migrate = run("manage.py", "migrate", cwd=project)
    assert migrate.returncode == 0, migrate.stderr
    demo = run("manage.py", "demo", cwd=project, timeout=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "ok   send_receipt ran" in demo.stdout
    assert "dead charge_card" in demo.stdout and "PaymentDeclined" in demo.stdout
    assert "remind_abandoned_cart ran" in demo.stdout
    assert "exit code 0" in demo.stdout
