"""Turning message dicts into bytes and back.

JSON is the default. Pickle can run arbitrary code when a message is decoded, so it is
only used when ``DJQUEUE["ENCODER"] = "pickle"`` is set explicitly, and djqueue warns
about it at start-up and in ``manage.py check``.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import pickle
import uuid
from typing import Any

from .errors import DecodeError

try:  # orjson is optional; it is several times faster than json on the hot path.
    import orjson

    # Handed to _refuse rather than written as orjson would: json does not take them.
    _ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

logger = logging.getLogger("djqueue")

MessageData = dict[str, Any]


class Encoder:
    """Encodes message dicts to bytes and decodes them back."""

    name = "base"

    def encode(self, data: MessageData) -> bytes:
        raise NotImplementedError("subclasses of Encoder must implement encode()")

    def decode(self, data: bytes) -> MessageData:
        raise NotImplementedError("subclasses of Encoder must implement decode()")


class JSONEncoder(Encoder):
    """JSON, the same with and without ``orjson``: ``str``, ``int`` (64 bits), finite
    ``float``, ``bool``, ``None``, lists (tuples become lists) and dicts with ``str`` keys;
    a ``UUID`` is sent as its string and an ``Enum`` as its value. Anything else (a
    ``datetime``, a ``Decimal``, a model instance, ``{1: ...}``, ``nan``) raises TypeError
    at send, naming where it is.

    orjson, when installed, encodes several times faster, but on its own it would take
    values json refuses (a ``datetime``, a dataclass), refuse some json takes (an ``int``
    key) and write ``nan`` as ``null``: a project's messages would depend on what is
    installed where. So orjson passes every value it does not write as above to
    ``_refuse``, and anything that fails goes the slow, checked way.
    """

    name = "json"

    def encode(self, data: MessageData) -> bytes:
        encoded = None
        if orjson is not None:
            try:
                encoded = orjson.dumps(data, default=_refuse, option=_ORJSON_OPTIONS)
            except TypeError:
                pass  # checked below, for the error to name the value (or for json to take it)
            else:
                # orjson writes nan and infinities as null: only then is a look needed.
                if encoded.find(b"null") < 0:  # find: half the time of `in` on bytes
                    return encoded
        if not _sendable(data):
            # Walked again, slowly, only to name the value at fault.
            for key, value in data.items():
                try:
                    _check(value, key)
                except TypeError as e:
                    raise TypeError(f"message is not JSON serializable: {e}") from None
        if encoded is not None:
            return encoded
        return json.dumps(data, separators=(",", ":"), allow_nan=False, default=_convert).encode("utf-8")

    def decode(self, data: bytes) -> MessageData:
        try:
            value = orjson.loads(data) if orjson is not None else json.loads(data)
        except RecursionError:
            # json (without orjson) recurses once per nesting level.
            raise DecodeError("payload is not valid JSON: nested too deeply to parse", data) from None
        except Exception as e:  # ValueError mostly; anything else is no message either
            value = _json_fallback(data, e)
        if not isinstance(value, dict):
            raise DecodeError(f"payload is JSON {type(value).__name__}, not an object", data)
        return value


# Integers orjson reads back exactly (it reads a larger one as a float).
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _refuse(value: Any) -> Any:
    raise TypeError


def _convert(value: Any) -> Any:
    """json's ``default``: what orjson writes by itself."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__qualname__} is not JSON serializable")


def _sendable(value: Any) -> bool:
    """Whether ``_check`` passes ``value``, without building the path of every value; the
    exact types of the usual message first (on every send whose message holds a None)."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return True
    if kind is int:
        return _INT_MIN <= value <= _INT_MAX
    if kind is float:
        return math.isfinite(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                return False
            if not _sendable(item):
                return False
        return True
    if kind is list or kind is tuple:
        return all(map(_sendable, value))
    # Subclasses (an IntEnum, a SafeString, an OrderedDict...) and the converted kinds.
    if isinstance(value, _CONVERTED):
        return _sendable(value.value) if isinstance(value, enum.Enum) else True
    if isinstance(value, str):
        return True
    if isinstance(value, int):
        return _INT_MIN <= value <= _INT_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _sendable(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return all(_sendable(item) for item in value)
    return False


_CONVERTED = (uuid.UUID, enum.Enum)


def _check(value: Any, where: str) -> None:
    """Raise TypeError naming the first value under ``where`` (``args[0]``, say) that is not
    JSON as djqueue sends it; what json would take but change (an int key) counts too."""
    if isinstance(value, str | bool | uuid.UUID) or value is None:
        return
    if isinstance(value, enum.Enum):
        _check(value.value, where)
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise TypeError(f"{where} is an integer beyond 64 bits; send it as a str")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where} is {value!r}, which JSON has no value for")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r}: JSON keys are str; convert it first")
            _check(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, f"{where}[{index}]")
    else:
        kind = type(value)
        raise TypeError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}; send str, int, float, bool, "
            "None, lists and dicts with str keys (a primary key rather than a model instance, "
            "value.isoformat() for a datetime)"
        )


def _json_fallback(data: bytes, error: Exception) -> Any:
    # orjson refuses what json writes for a lone surrogate (and what an older producer's
    # json wrote for nan): json reads it.
    if orjson is not None:
        try:
            return json.loads(data)
        except Exception:
            pass
    raise DecodeError(f"payload is not valid JSON: {error}", data) from None


class PickleEncoder(Encoder):
    """Only safe when every producer on the broker is trusted."""

    name = "pickle"

    def encode(self, data: MessageData) -> bytes:
        return pickle.dumps(data)

    def decode(self, data: bytes) -> MessageData:
        try:
            value = pickle.loads(data)
        except Exception as e:
            raise DecodeError(f"payload is not a valid pickle: {e}", data) from None
        if not isinstance(value, dict):
            raise DecodeError(f"payload unpickles to {type(value).__name__}, not a dict", data)
        return value


ENCODERS: dict[str, type[Encoder]] = {"json": JSONEncoder, "pickle": PickleEncoder}

_encoder: Encoder = JSONEncoder()


def get_encoder() -> Encoder:
    return _encoder


def set_encoder(encoder: Encoder | str) -> Encoder:
    """Set the global encoder; a name ("json", "pickle") or an Encoder instance."""
    global _encoder
    if isinstance(encoder, str):
        try:
            encoder = ENCODERS[encoder]()
        except KeyError:
            raise ValueError(
                f"unknown encoder {encoder!r}; DJQUEUE['ENCODER'] must be one of {sorted(ENCODERS)}"
            ) from None
    if isinstance(encoder, PickleEncoder):
        logger.warning(
            "djqueue is using the pickle encoder: a message from an untrusted producer "
            "can run arbitrary code in your workers. Use the default JSON encoder unless "
            "every producer is trusted."
        )
    _encoder = encoder
    return encoder
