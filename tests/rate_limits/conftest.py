from __future__ import annotations

import pytest

from tests.rate_limits.backends import BACKENDS, backend_fixture

backend = pytest.fixture(params=BACKENDS)(backend_fixture)
