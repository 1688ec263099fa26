"""Errors that end a request with a definite answer.

Every error here carries the HTTP status the partner receives and a reason a person can act on.
Partner plugins raise :class:`MappingError` (or :class:`InvalidField`) for unusable input; the core
turns every one of these into a JSON body ``{"status": "error", "error": ..., "reason": ...}``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class: an answer with a status code and a reason."""

    status_code = 400
    error = "bad_request"

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def body(self) -> dict[str, str]:
        out = {"status": "error", "error": self.error, "reason": self.reason}
        if self.field is not None:
            out["field"] = self.field
        return out

    def headers(self) -> dict[str, str] | None:
        """Headers the answer carries besides the JSON body."""
        return None


class BadRequest(GatewayError):
    """The request could not be read (malformed body, bad encoding, bad parameter)."""


class Unauthorized(GatewayError):
    status_code = 401
    error = "unauthorized"


class Forbidden(GatewayError):
    status_code = 403
    error = "forbidden"


class NotFound(GatewayError):
    status_code = 404
    error = "not_found"


class Conflict(GatewayError):
    status_code = 409
    error = "conflict"


class RateLimited(GatewayError):
    """The key has used up its requests for the current window (``[limits] rate_per_key``).
    Transient: the partner retries after ``Retry-After`` seconds."""

    status_code = 429
    error = "rate_limited"

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class MappingError(GatewayError):
    """The payload was read but cannot become an attribution event.

    Plugins raise this (usually through the :mod:`gateway.normalise` helpers) with the partner's
    field name, so the partner sees which field to fix.
    """

    status_code = 422
    error = "invalid_payload"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}", field=field)


class StorageUnavailable(GatewayError):
    """Storage could not make the event durable; partners retry on 5xx."""

    status_code = 503
    error = "storage_unavailable"


class PluginFailure(GatewayError):
    """A partner plugin raised something other than MappingError: our bug, not the partner's.
    Answered 500 so the partner retries once the plugin is fixed."""

    status_code = 500
    error = "plugin_failure"


class StatusUnavailable(GatewayError):
    status_code = 503
    error = "status_unavailable"
