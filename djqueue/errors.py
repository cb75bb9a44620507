"""The exception tree. Everything djqueue raises on purpose derives from DjqueueError."""

from __future__ import annotations


class DjqueueError(Exception):
    """Root of every djqueue exception."""


class ConfigurationError(DjqueueError):
    """A setting or an argument is wrong; the message says which and how to fix it."""


class BrokerError(DjqueueError):
    """The broker could not do what was asked."""


class ConnectionError(BrokerError):
    """The broker cannot be reached; the operation may be retried."""


class QueueNotFound(BrokerError):
    """A queue that was never declared was used."""


class ActorNotFound(DjqueueError):
    """A message names an actor that is not registered."""


class DecodeError(DjqueueError):
    """Bytes on the wire could not be turned into a Message."""

    def __init__(self, message: str, data: bytes | str | None = None) -> None:
        super().__init__(message)
        self.data = data


class MessageTooLarge(DjqueueError):
    """An encoded message is larger than DJQUEUE["MAX_MESSAGE_SIZE"]."""


class Retry(DjqueueError):
    """Raise inside an actor to retry the message, optionally after ``delay`` ms."""

    def __init__(self, message: str = "", delay: int | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class TimeLimitExceeded(DjqueueError):
    """Raised inside an actor that ran past its ``time_limit``."""


class SkipMessage(DjqueueError):
    """Raised by a middleware's before_process_message to skip (and ack) a message."""


class RateLimitExceeded(DjqueueError):
    """A rate limiter refused to admit the caller; Retries retries it with backoff."""


class ResultError(DjqueueError):
    """Base of the result lookup errors."""


class ResultMissing(ResultError):
    """No result is stored (yet) for that message."""


class ResultTimeout(ResultError):
    """Waiting for a result took longer than the given timeout."""


class ResultFailure(ResultError):
    """The actor failed for good; ``exception_type`` and ``exception_message`` say why."""

    def __init__(self, message: str = "", exception_type: str = "", exception_message: str = "") -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.exception_message = exception_message
