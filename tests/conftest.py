from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def record_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory where test actors (tests/testapp/tasks.py) record their runs, for this
    process and every worker process it starts."""
    directory = tmp_path / "records"
    directory.mkdir()
    monkeypatch.setenv("DJQUEUE_TEST_RECORD_DIR", str(directory))
    return directory


@pytest.fixture(autouse=True)
def _fresh_record_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if "DJQUEUE_TEST_RECORD_DIR" in os.environ:
        monkeypatch.delenv("DJQUEUE_TEST_RECORD_DIR")
