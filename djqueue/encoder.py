"""Turning message dicts into bytes and back.

JSON is the default. Pickle can run arbitrary code when a message is decoded, so it is
only used when ``DJQUEUE["ENCODER"] = "pickle"`` is set explicitly, and djqueue warns
about it at start-up and in ``manage.py check``.
"""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any

from .errors import DecodeError

try:  # orjson is optional; it is several times faster than json on the hot path.
    import orjson
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
    name = "json"

    def encode(self, data: MessageData) -> bytes:
        if orjson is not None:
            try:
                return orjson.dumps(data)
            except TypeError as e:
                raise TypeError(f"message is not JSON serializable: {e}") from None
        try:
            return json.dumps(data, separators=(",", ":")).encode("utf-8")
        except TypeError as e:
            raise TypeError(f"message is not JSON serializable: {e}") from None

    def decode(self, data: bytes) -> MessageData:
        try:
            value = orjson.loads(data) if orjson is not None else json.loads(data)
        except RecursionError:
            # json (without orjson) recurses once per nesting level.
            raise DecodeError("payload is not valid JSON: nested too deeply to parse", data) from None
        except Exception as e:  # ValueError mostly; anything else is no message either
            raise DecodeError(f"payload is not valid JSON: {e}", data) from None
        if not isinstance(value, dict):
            raise DecodeError(f"payload is JSON {type(value).__name__}, not an object", data)
        return value


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
