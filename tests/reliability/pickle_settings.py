"""The test settings with the pickle encoder, for the warning tests of test_security.py."""

from tests.settings import *  # noqa: F403
from tests.settings import DJQUEUE

DJQUEUE = {**DJQUEUE, "ENCODER": "pickle"}
