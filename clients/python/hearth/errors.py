"""Hearth's D-Bus errors (org.hearth.Hearth1.Error.*) as Python exceptions, one class per name."""

from __future__ import annotations

from typing import Any, Dict, Optional

PREFIX = "org.hearth.Hearth1.Error."


class HearthError(Exception):
    """A failure hearthd reported: `name` is the full D-Bus error name, `message` its text.

    `result` is set when a generation failed after it started (the Finished result, with the
    text generated up to then)."""

    def __init__(self, name: str, message: str, result: Optional[Dict[str, Any]] = None):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.result = result


class InvalidArgs(HearthError):
    """A request key is missing, unknown, of the wrong type or out of range."""


class ContextLengthExceeded(HearthError):
    """The prompt does not fit the model's context."""


class ModelNotFound(HearthError):
    """No model of that name is installed."""


class ModelUnavailable(HearthError):
    """The model exists but cannot be used now (its load failed, memory)."""


class Busy(HearthError):
    """The queue is full; retry later."""


class Cancelled(HearthError):
    """The request was cancelled (by its caller, a deadline, shutdown)."""


class NotAuthorized(HearthError):
    """The caller may not do this."""


class PrivacyViolation(HearthError):
    """Serving the request would break a privacy scope."""


class CloudUnavailable(HearthError):
    """The cloud route is not available."""


class EngineFailed(HearthError):
    """The model's engine process died or hung."""


class Internal(HearthError):
    """A failure inside hearthd."""


class BusError(HearthError):
    """An error that is not Hearth's (the bus's own, e.g. the service is not running)."""


_BY_NAME = {
    PREFIX + cls.__name__: cls
    for cls in (
        InvalidArgs,
        ContextLengthExceeded,
        ModelNotFound,
        ModelUnavailable,
        Busy,
        Cancelled,
        NotAuthorized,
        PrivacyViolation,
        CloudUnavailable,
        EngineFailed,
        Internal,
    )
}


def from_name(name: str, message: str, result: Optional[Dict[str, Any]] = None) -> HearthError:
    """The exception for D-Bus error `name`: its own class, HearthError for a Hearth error
    this client does not know yet, BusError for any other."""
    if name in _BY_NAME:
        return _BY_NAME[name](name, message, result)
    if name.startswith(PREFIX):
        return HearthError(name, message, result)
    return BusError(name, message, result)
