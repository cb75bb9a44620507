"""System checks: a bad DJQUEUE setting fails ``manage.py check`` at start-up.

Ids are stable and documented in docs/settings.md:

- djqueue.E001 unknown broker URL scheme
- djqueue.E002 malformed broker URL (or one naming an unknown database alias)
- djqueue.E003 a MIDDLEWARE entry cannot be imported
- djqueue.E004 a setting has a bad value
- djqueue.E005 the broker cannot be built (e.g. its client library is missing)
- djqueue.E006 settings.DJQUEUE is not a dict (so all of it is ignored)
- djqueue.E007 an amqp:// broker URL names the empty virtual host ('//')
- djqueue.E010-E019, W005 crontab entries (see scheduling/checks.py)
- djqueue.W001 the pickle encoder is in use
- djqueue.W002 an unknown key in DJQUEUE (a typo?)
- djqueue.W003 a SQLite database djqueue's workers write to lacks transaction_mode IMMEDIATE
- djqueue.W004 a DJQUEUE_* Django setting, which djqueue does not read
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from . import conf
from .brokers import BROKER_CLASSES, mask_url
from .errors import ConfigurationError

# Setting -> the hint shown when it is not a positive whole number.
_POSITIVE_INTS = {
    "RESULT_TTL": f"A time in milliseconds; the default is {conf.DEFAULTS['RESULT_TTL']} (24 h).",
    "MAX_MESSAGE_SIZE": f"A size in bytes; the default is {conf.DEFAULTS['MAX_MESSAGE_SIZE']} (1 MiB).",
    "DEAD_LETTER_TTL": f"A time in milliseconds; the default is {conf.DEFAULTS['DEAD_LETTER_TTL']} (7 days).",
    "MAX_DELIVERIES": f"A number of deliveries; the default is {conf.DEFAULTS['MAX_DELIVERIES']}.",
    "SHUTDOWN_TIMEOUT": f"A time in milliseconds; the default is {conf.DEFAULTS['SHUTDOWN_TIMEOUT']} (30 s).",
}
REDIS_URL_EXAMPLE = "'redis://localhost:6379/0' ('rediss://' for TLS)"
# What the W003 hint suggests: the options docs/database-broker.md recommends.
SQLITE_OPTIONS = {
    "transaction_mode": "IMMEDIATE",
    "timeout": 20,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    value = getattr(settings, "DJQUEUE", None)
    if value is not None and not isinstance(value, dict):
        # Everything else would only describe the defaults that replace it.
        return [_not_a_dict(value), *_check_stray_settings()]
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
    errors += _check_sqlite()
    errors += _check_stray_settings()
    return errors


def _not_a_dict(value: Any) -> Any:
    example = "redis://localhost:6379/0"
    what = f"a {type(value).__name__}"
    if isinstance(value, str):
        what = f"the string {mask_url(value)!r}"
        if "://" in value:
            example = mask_url(value)
    password = " (with your password for ***)" if "***" in example else ""
    return Error(
        f"settings.DJQUEUE is {what}, not a dict, so djqueue ignores it and runs on its defaults "
        f"(broker: {mask_url(conf.get('BROKER_URL'))}).",
        hint=f"DJQUEUE is a dict of settings: DJQUEUE = {{'BROKER_URL': {example!r}}}{password} "
        "(see docs/settings.md).",
        id="djqueue.E006",
    )


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
    if scheme in ("amqp", "amqps"):
        return _check_vhost(url)
    return []


def _check_vhost(url: str) -> list[Any]:
    """E007 for every cluster node URL whose path names the empty virtual host.

    pika takes the first path segment as the virtual host, so ``amqp://host:5672//`` (the
    Celery/kombu spelling of vhost ``/``) asks RabbitMQ for vhost ``''``, which it refuses
    at the first send, long after start-up.
    """
    errors = []
    for part in url.split(";"):
        path = urlsplit(part.strip()).path
        if len(path) > 1 and not unquote(path.split("/")[1]):
            fixed = urlsplit(mask_url(part.strip()))._replace(path="/%2F").geturl()
            errors.append(
                Error(
                    f"DJQUEUE['BROKER_URL'] (or DJQUEUE_BROKER_URL) {mask_url(part.strip())!r} names "
                    "the empty RabbitMQ virtual host ('//' after the host): RabbitMQ refuses it at the "
                    "first send with 'NOT_ALLOWED - vhost  not found'.",
                    hint=f"For the default virtual host '/', URL-encode it as %2F: {fixed!r} "
                    "(Celery and kombu read '//' as '/'; djqueue, like pika, does not).",
                    id="djqueue.E007",
                )
            )
    return errors


def _shown(value: Any) -> Any:
    """A setting's value as it may appear in a message: any password masked."""
    return mask_url(value) if isinstance(value, str) else value


def _check_values() -> list[Any]:
    errors = []

    def bad(key: str, why: str, hint: str) -> None:
        errors.append(Error(f"DJQUEUE[{key!r}] {why}", hint=hint, id="djqueue.E004"))

    if not isinstance(conf.get("BROKER_OPTIONS"), dict):
        bad("BROKER_OPTIONS", "must be a dict of keyword arguments.", "Use e.g. {} or {'namespace': 'app'}.")
    for key, hint in _POSITIVE_INTS.items():
        value = conf.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            bad(key, f"must be a positive whole number, not {value!r}.", hint)
    module = conf.get("TASKS_MODULE")
    if not isinstance(module, str) or not module.isidentifier():
        bad("TASKS_MODULE", f"must be a module name such as 'tasks', not {module!r}.", "Use 'tasks'.")
    if conf.get("ENCODER") not in ("json", "pickle"):
        bad("ENCODER", f"must be 'json' or 'pickle', not {conf.get('ENCODER')!r}.", "Use 'json'.")
    backend = conf.get("RESULT_BACKEND")
    if not (backend == "db" or (isinstance(backend, str) and backend.startswith(("redis://", "rediss://")))):
        bad(
            "RESULT_BACKEND",
            f"must be 'db' or a redis:// URL, not {_shown(backend)!r}.",
            f"Use 'db' (the default: rows in your database) or a Redis URL such as {REDIS_URL_EXAMPLE}.",
        )
    rate = conf.get("RATE_LIMIT_BACKEND")
    if rate is not None and not (
        rate in ("db", "memory") or (isinstance(rate, str) and rate.startswith(("redis://", "rediss://")))
    ):
        bad(
            "RATE_LIMIT_BACKEND",
            f"must be 'db', 'memory' or a redis:// URL, not {_shown(rate)!r}.",
            f"Use 'db', 'memory' or a Redis URL such as {REDIS_URL_EXAMPLE}, or leave it out "
            "(Redis if the broker is Redis, else the database).",
        )
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


def _check_sqlite() -> list[Any]:
    """W003 for each SQLite database that several worker processes write to at once
    without ``transaction_mode = "IMMEDIATE"``.

    In SQLite's default (DEFERRED) mode a transaction that reads before it writes, as
    ``update_or_create`` does for a dead letter, can fail at once with "database is locked"
    when another process writes, without waiting for the timeout. Django 5.1 added the
    option, so every supported Django version (5.2, 6.x) has it.
    """
    from django.db import router

    from .models import DeadLetter, TaskResult

    url = conf.get("BROKER_URL")
    if not isinstance(url, str) or url.lower().startswith("stub://"):
        return []  # in memory, in one process: nothing else writes at the same time
    uses: dict[str, list[str]] = {}
    if url.lower().startswith("db://"):
        try:
            alias = urlsplit(url).netloc
        except ValueError:
            alias = ""  # reported by E002
        uses.setdefault(alias, []).append(f"the database broker's queue ({mask_url(url)})")
    uses.setdefault(router.db_for_write(DeadLetter), []).append("dead letters")
    if conf.get("RESULT_BACKEND") == "db":
        uses.setdefault(router.db_for_write(TaskResult), []).append("results (RESULT_BACKEND 'db')")
    databases = getattr(settings, "DATABASES", None) or {}
    warnings = []
    for alias, what in uses.items():
        config = databases.get(alias)
        if not isinstance(config, dict) or str(config.get("ENGINE", "")).rsplit(".", 1)[-1] not in (
            "sqlite3",
            "spatialite",
        ):
            continue
        options = config.get("OPTIONS") or {}
        mode = options.get("transaction_mode") if isinstance(options, dict) else None
        if isinstance(mode, str) and mode.upper() in ("IMMEDIATE", "EXCLUSIVE"):
            continue
        held = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
        warnings.append(
            Warning(
                f"DATABASES[{alias!r}] is a SQLite database without OPTIONS['transaction_mode'] = "
                f"'IMMEDIATE'. It holds {held}, which several worker processes write at once: "
                "under load they fail with 'OperationalError: database is locked'.",
                hint=f"Set DATABASES[{alias!r}]['OPTIONS'] = {SQLITE_OPTIONS!r} (merged with any "
                "options it has; see 'SQLite settings' in docs/database-broker.md), or use PostgreSQL.",
                id="djqueue.W003",
            )
        )
    return warnings


def _check_stray_settings() -> list[Any]:
    """W004 for each ``DJQUEUE_*`` Django setting: djqueue reads only ``settings.DJQUEUE``.

    A setting whose value is itself a value of the DJQUEUE dict is a helper variable
    (``DJQUEUE_BROKER_URL = env(...)`` then ``"BROKER_URL": DJQUEUE_BROKER_URL``): it is used.
    """
    used = [id(v) for v in conf.user_settings().values() if v is not None]
    warnings = []
    for name in sorted(n for n in dir(settings) if n.startswith("DJQUEUE_")):
        if id(getattr(settings, name, None)) in used:
            continue
        key = name.removeprefix("DJQUEUE_")
        if key == "BROKER_URL":
            msg = (
                f"settings.{name} is not read by djqueue: {conf.BROKER_URL_ENV} is an environment "
                f"variable, not a Django setting, so the broker is {mask_url(conf.get('BROKER_URL'))}."
            )
            hint = (
                f"Move it into the DJQUEUE dict: DJQUEUE = {{'BROKER_URL': ...}}, or export "
                f"{conf.BROKER_URL_ENV} in the environment of every process instead."
            )
        elif key in conf.DEFAULTS:
            msg = f"settings.{name} is not read by djqueue and has no effect."
            hint = f"Move it into the DJQUEUE dict: DJQUEUE = {{{key!r}: ...}} (see docs/settings.md)."
        else:
            msg = f"settings.{name} is not read by djqueue and has no effect."
            hint = (
                "djqueue reads only settings.DJQUEUE, a dict with the keys "
                f"{', '.join(sorted(conf.DEFAULTS))}, and the {conf.BROKER_URL_ENV} environment "
                "variable. If it is a helper for the rest of settings.py, rename it or add "
                "'djqueue.W004' to SILENCED_SYSTEM_CHECKS."
            )
        warnings.append(Warning(msg, hint=hint, id="djqueue.W004"))
    return warnings
