"""The test settings plus crontabs: for scheduler and worker processes started by tests.

``DJQUEUE_TEST_CRONTABS`` (JSON) is the CRONTABS setting, so each test configures its
own entries for the processes it starts.
"""

import json
import os

from tests.settings import *  # noqa: F403
from tests.settings import DJQUEUE, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "tests.scheduling.schedapp"]
DJQUEUE = {**DJQUEUE, "CRONTABS": json.loads(os.environ.get("DJQUEUE_TEST_CRONTABS", "{}"))}
