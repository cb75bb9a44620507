"""System checks: a bad DJQUEUE setting fails ``manage.py check`` at start-up.

Ids are stable and documented in docs/settings.md:

- djqueue.E001 unknown broker URL scheme
- djqueue.E002 malformed broker URL (or one naming an unknown database alias)
- djqueue.E003 a MIDDLEWARE entry cannot be imported
- djqueue.E004 a setting has a bad value
- djqueue.E005 the broker cannot be built (e.g. its client library is missing)
- djqueue.E010-E019 crontab entries (see scheduling/checks.py)
- djqueue.W001 the pickle encoder is in use
- djqueue.W002 an unknown key in DJQUEUE (a typo?)
"""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Tags, Warning, register

from . import conf
from .brokers import BROKER_CLASSES, mask_url
from .errors import ConfigurationError

_POSITIVE_INTS = ("RESULT_TTL", "MAX_MESSAGE_SIZE", "DEAD_LETTER_TTL", "MAX_DELIVERIES", "SHUTDOWN_TIMEOUT")


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    errors: list[Any] = []
    user = conf.user_settings()
    for key in sorted(set(user) - set(conf.DEFAULTS)):
        errors.append(
            Warning(
                f"DJQUEUE[{key!r}] is not a djqueue setting and is ignored.",
                hint=f"Known settings: {', '.join(sorted(conf.DEFAULTS))}.",
                id="djqueue.W002",
            )
        )
    errors += _check_url(conf.get("BROKER_URL"))
    errors += _check_values()
    errors += _check_middleware()
    if not errors:
        errors += _check_broker()
    if conf.get("ENCODER") == "pickle":
        errors.append(
            Warning(
                "DJQUEUE['ENCODER'] is 'pickle': a message from an untrusted producer can run "
                "arbitrary code in your workers.",
                hint="Use the default 'json' encoder unless every producer is trusted.",
                id="djqueue.W001",
            )
        )
    return errors


def _check_url(url: Any) -> list[Any]:
    if not isinstance(url, str) or "://" not in url:
        return [
            Error(
                f"DJQUEUE['BROKER_URL'] (or DJQUEUE_BROKER_URL) is {mask_url(str(url))!r}, "
                "which is not a URL.",
                hint="Use e.g. 'db://default', 'redis://localhost:6379/0' or "
                "'amqp://guest:guest@localhost:5672/%2F'.",
                id="djqueue.E002",
            )
        ]
    scheme = url.split("://", 1)[0].lower()
    if scheme not in BROKER_CLASSES:
        return [
            Error(
                f"DJQUEUE['BROKER_URL'] has the unknown scheme {scheme!r} ({mask_url(url)}).",
                hint=f"Use one of: {', '.join(s + '://' for s in BROKER_CLASSES)}.",
                id="djqueue.E001",
            )
        ]
    try:
        from .brokers import broker_class_for

        broker_class_for(url).check_url(url)  # type: ignore[attr-defined]
    except ConfigurationError as e:
        return [Error(f"DJQUEUE['BROKER_URL'] is malformed: {e}", id="djqueue.E002")]
    except ImportError as e:
        return [
            Error(
                f"the broker for {scheme}:// cannot be imported: {e}",
                hint="Install the broker's client library: pip install 'djqueue[redis]' for redis://, "
                "'djqueue[rabbitmq]' for amqp://, 'djqueue[postgres]' for PostgreSQL.",
                id="djqueue.E005",
            )
        ]
    return []


def _check_values() -> list[Any]:
    errors = []

    def bad(key: str, why: str, hint: str) -> None:
        errors.append(Error(f"DJQUEUE[{key!r}] {why}", hint=hint, id="djqueue.E004"))

    if not isinstance(conf.get("BROKER_OPTIONS"), dict):
        bad("BROKER_OPTIONS", "must be a dict of keyword arguments.", "Use e.g. {} or {'namespace': 'app'}.")
    for key in _POSITIVE_INTS:
        value = conf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            bad(key, f"must be a positive whole number, not {value!r}.", "Times are in milliseconds.")
    module = conf.get("TASKS_MODULE")
    if not isinstance(module, str) or not module.isidentifier():
        bad("TASKS_MODULE", f"must be a module name such as 'tasks', not {module!r}.", "Use 'tasks'.")
    if conf.get("ENCODER") not in ("json", "pickle"):
        bad("ENCODER", f"must be 'json' or 'pickle', not {conf.get('ENCODER')!r}.", "Use 'json'.")
    backend = conf.get("RESULT_BACKEND")
    if not (backend == "db" or (isinstance(backend, str) and backend.startswith(("redis://", "rediss://")))):
        bad("RESULT_BACKEND", f"must be 'db' or a redis:// URL, not {backend!r}.", "Use 'db'.")
    rate = conf.get("RATE_LIMIT_BACKEND")
    if rate is not None and not (
        rate in ("db", "memory") or (isinstance(rate, str) and rate.startswith(("redis://", "rediss://")))
    ):
        bad("RATE_LIMIT_BACKEND", f"must be 'db', 'memory' or a redis:// URL, not {rate!r}.", "Use 'db'.")
    if not isinstance(conf.get("CRONTABS"), dict):
        bad("CRONTABS", "must be a dict of name -> entry.", "See the README's Scheduling section.")
    if not isinstance(conf.get("ENQUEUE_ON_COMMIT"), bool):
        bad("ENQUEUE_ON_COMMIT", "must be True or False.", "Use False (the default) or True.")
    return errors


def _check_middleware() -> list[Any]:
    paths = conf.get("MIDDLEWARE")
    if paths is None:
        return []
    if not isinstance(paths, list | tuple):
        return [
            Error(
                "DJQUEUE['MIDDLEWARE'] must be None or a list of dotted paths.",
                hint="Start from djqueue.middleware.DEFAULT_MIDDLEWARE.",
                id="djqueue.E004",
            )
        ]
    from .middleware import load_middleware

    errors = []
    for path in paths:
        if not isinstance(path, str):
            continue
        try:
            load_middleware(path)
        except Exception as e:
            errors.append(
                Error(
                    f"DJQUEUE['MIDDLEWARE'] entry {path!r} cannot be loaded: {e}",
                    hint="Check the dotted path; the defaults are in djqueue.middleware.DEFAULT_MIDDLEWARE.",
                    id="djqueue.E003",
                )
            )
    return errors


def _check_broker() -> list[Any]:
    from django.apps import apps

    config = apps.get_app_config("djqueue")
    error = getattr(config, "startup_error", None)
    if error is None:
        return []
    return [
        Error(
            f"the broker for {mask_url(conf.get('BROKER_URL'))!r} cannot be built: {error}",
            hint="Check DJQUEUE['BROKER_URL'] and DJQUEUE['BROKER_OPTIONS'].",
            id="djqueue.E005",
        )
    ]
