"""Dramatiq's worker with Django set up first, as django_dramatiq's ``rundramatiq`` runs
it: ``dramatiq benchmarks.peers.dramatiq_django_app -p P -t T -Q QUEUE``.

The same actors and broker as dramatiq_app; only ``django.setup()`` (with the
benchmark settings djqueue's workers use) comes first. It is measured for memory only:
it is what a Django team that picks Dramatiq runs, and so the like-for-like peer of a
djqueue worker, which is always a Django process.
"""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
django.setup()

from benchmarks.peers.dramatiq_app import (  # noqa: E402
    broker,
    close,
    flush,
    noop,
    ping,
    send,
    send_batch,
    sleepy,
)

__all__ = ["broker", "close", "flush", "noop", "ping", "send", "send_batch", "sleepy"]
