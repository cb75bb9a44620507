"""Messages: what is sent to a broker, and what a worker hands to an actor."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .encoder import get_encoder
from .errors import DecodeError

if TYPE_CHECKING:
    from .composition import pipeline


def generate_unique_id() -> str:
    """A random (version 4) UUID as a string, as ``str(uuid.uuid4())`` gives, in a
    quarter of its time: every send makes one."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def current_millis() -> int:
    return int(time.time() * 1000)


_FIELDS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")
_FIELD_SET = frozenset(_FIELDS)
_FIELD_TYPES = (
    ("queue_name", str),
    ("actor_name", str),
    ("message_id", str),
    ("args", list),
    ("kwargs", dict),
    ("options", dict),
    ("message_timestamp", int),
)
# Options the library computes with (Message.eta, .priority, .retries): a value that cannot
# be one fails the decode, so no consumer meets it later in a computation (an eta of
# Infinity once crashed the RabbitMQ consumer in a loop).
_NUMERIC_OPTIONS = frozenset(("eta", "priority", "retries"))


def _numeric_option_error(options: dict[str, Any]) -> str | None:
    """Why one of the numeric options is unusable, or None."""
    eta = options.get("eta")
    if eta is not None and not (isinstance(eta, int) or (isinstance(eta, float) and math.isfinite(eta))):
        return f"message option 'eta' must be a finite number of ms since the epoch, not {_shown(eta)}"
    for name in ("priority", "retries"):
        value = options.get(name)
        if value is not None:  # null: not set
            try:
                int(value)
            except Exception:  # ValueError, TypeError, OverflowError: whatever int() of junk raises
                return f"message option {name!r} must be a whole number, not {_shown(value)}"
    return None


def _shown(value: Any) -> str:
    # Never the repr of a container: a deeply nested one raises RecursionError.
    if isinstance(value, str | int | float):
        text = repr(value) if not isinstance(value, int) or value.bit_length() < 256 else "a huge number"
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__}"


@dataclass(slots=True)
class Message:
    """One job: which actor to run, with which arguments.

    ``options`` carries per-message settings (``priority``, ``eta`` in ms since the
    epoch, ``retries`` done so far, ``max_retries``, ...) and anything a middleware
    needs to travel with the message.
    """

    queue_name: str
    actor_name: str
    args: tuple[Any, ...] | list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    message_id: str = field(default_factory=generate_unique_id)
    message_timestamp: int = field(default_factory=current_millis)

    def asdict(self) -> dict[str, Any]:
        return {
            "queue_name": self.queue_name,
            "actor_name": self.actor_name,
            "args": list(self.args),
            "kwargs": self.kwargs,
            "options": self.options,
            "message_id": self.message_id,
            "message_timestamp": self.message_timestamp,
        }

    def encode(self) -> bytes:
        return get_encoder().encode(self.asdict())

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Decode and validate bytes from the wire; raises DecodeError saying what is wrong.

        Any failure is a DecodeError, whatever the encoder raised (a RecursionError for
        deeply nested JSON, say): consumers yield it as a malformed message, which the
        worker dead-letters, rather than crash on it.
        """
        try:
            return cls.from_dict(get_encoder().decode(data), data)
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(f"payload could not be decoded: {type(e).__name__}: {e}", data) from None

    @classmethod
    def from_dict(cls, value: dict[str, Any], data: bytes | None = None) -> Message:
        try:
            queue_name = value["queue_name"]
            actor_name = value["actor_name"]
            message_id = value["message_id"]
        except KeyError:
            missing = [name for name in ("queue_name", "actor_name", "message_id") if name not in value]
            raise DecodeError(f"message is missing the field(s) {', '.join(missing)}", data) from None
        if not _FIELD_SET.issuperset(value):
            unknown = set(value) - _FIELD_SET
            raise DecodeError(f"message has unknown field(s) {', '.join(sorted(unknown))}", data)
        args = value.get("args", [])
        kwargs = value.get("kwargs", {})
        options = value.get("options", {})
        timestamp = value.get("message_timestamp", 0)
        # One test for the usual, well-formed message (every worker decodes each one);
        # the field at fault is looked for only when it fails.
        if not (
            isinstance(queue_name, str)
            and isinstance(actor_name, str)
            and isinstance(message_id, str)
            and isinstance(args, list)
            and isinstance(kwargs, dict)
            and isinstance(options, dict)
            and isinstance(timestamp, int)
        ):
            for name, kind in _FIELD_TYPES:
                if name in value and not isinstance(value[name], kind):
                    raise DecodeError(
                        f"message field {name!r} must be {kind.__name__}, not {type(value[name]).__name__}",
                        data,
                    )
        if options and not _NUMERIC_OPTIONS.isdisjoint(options):
            reason = _numeric_option_error(options)
            if reason is not None:
                raise DecodeError(reason, data)
        return cls(
            queue_name=queue_name,
            actor_name=actor_name,
            args=tuple(args),
            kwargs=kwargs,
            options=options,
            message_id=message_id,
            message_timestamp=timestamp,
        )

    def copy(self, **attributes: Any) -> Message:
        """A copy with some attributes replaced; ``options`` is merged, not replaced."""
        updated = self.asdict()
        options = attributes.pop("options", None)
        updated["options"] = {**self.options, **(options or {})}
        updated.update(attributes)
        updated["args"] = tuple(updated["args"])
        return Message(**updated)

    @property
    def priority(self) -> int:
        return int(self.options.get("priority") or 0)

    @property
    def eta(self) -> int | None:
        """When the message becomes due, in ms since the epoch (None: now)."""
        return self.options.get("eta")

    @property
    def retries(self) -> int:
        return int(self.options.get("retries") or 0)

    def get_result(self, *, block: bool = False, timeout: int | None = None) -> Any:
        """The actor's return value. ``timeout`` is in ms (default 10,000 when blocking).

        Raises ResultMissing, ResultTimeout or ResultFailure.
        """
        from .results import get_result_backend

        return get_result_backend().get_result(self, block=block, timeout=timeout)

    def cancel(self) -> bool:
        """Remove this message from its queue before it starts; True if it was found."""
        from .brokers import cancel

        return cancel(self.message_id, queue_name=self.queue_name)

    def __or__(self, other: Message | pipeline) -> pipeline:
        from .composition import pipeline

        return pipeline([self, other])

    def __str__(self) -> str:
        params = ", ".join(_short(arg) for arg in self.args)
        if self.kwargs:
            params += ", " if params else ""
            params += ", ".join(f"{k}={_short(v)}" for k, v in self.kwargs.items())
        return f"{self.actor_name}({params})"


# str(message) is how log lines name a job (a failure, say): each argument's repr is
# cut to this many characters, so that a job given a document or a blob logs a line
# someone can read rather than the whole payload.
ARG_REPR_LIMIT = 200


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) <= ARG_REPR_LIMIT:
        return text
    return f"{text[:ARG_REPR_LIMIT]}... ({len(text):,} characters)"
