"""The test settings with djqueue as the django.tasks backend, for worker processes."""

from tests.settings import *  # noqa: F403

TASKS = {"default": {"BACKEND": "djqueue.backends.DjqueueTaskBackend", "QUEUES": []}}
