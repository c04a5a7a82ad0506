"""Errors of the evaluate protocol, imported by both sides.

Client side (the trainer): every failed call to a service is an :class:`AtroposAPIError`:
:class:`AtroposUnavailableError` (gave up retrying), :class:`AtroposRequestError` (the request is
wrong: a 4xx, or refused before sending) or :class:`AtroposProtocolError` (a 2xx whose body breaks
the contract). Service side: :class:`ContractError`, a request that breaks the contract (HTTP 422).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AtroposAPIError",
    "AtroposProtocolError",
    "AtroposRequestError",
    "AtroposUnavailableError",
    "ContractError",
]


class AtroposAPIError(Exception):
    """Base of every error the clients raise about a service call."""


class AtroposUnavailableError(AtroposAPIError):
    """The service could not be reached or kept failing: the client gave up retrying.

    ``attempts`` and ``elapsed_s`` say how hard it tried, ``last_cause`` what went wrong last
    (``last_status`` is its HTTP status, None for connection errors and timeouts) and ``reason``
    which bound ended it.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        url: str,
        attempts: int,
        elapsed_s: float,
        last_cause: str,
        last_status: int | None,
        reason: str,
    ) -> None:
        super().__init__(message)
        self.method = method
        self.url = url
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last_cause = last_cause
        self.last_status = last_status
        self.reason = reason


class AtroposRequestError(AtroposAPIError):
    """The request itself is wrong; retrying it cannot help.

    ``status`` is the HTTP status the service answered (a 4xx), or None when the client refused
    to send the request because it breaks the contract (lists of different lengths, wrong types).
    ``code`` and ``service_message`` come from the service's ``{"error": {...}}`` body.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        code: str | None = None,
        service_message: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.service_message = service_message
        self.method = method
        self.url = url


class AtroposProtocolError(AtroposAPIError):
    """A successful answer whose body breaks the contract (undecodable, wrong types or sizes).

    ``field`` names the offending field (``"advantages"``, ``"scores"``, ``"metrics.accuracy"``,
    ``"body"``), ``sample_index`` the sample when one is at fault, ``expected`` and ``actual`` the
    sizes when sizes disagree. Not retried: a service that answers nonsense once will again.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str,
        sample_index: int | None = None,
        expected: Any = None,
        actual: Any = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.sample_index = sample_index
        self.expected = expected
        self.actual = actual
        self.method = method
        self.url = url


class ContractError(ValueError):
    """A request that is valid JSON/msgpack but breaks the contract (HTTP 422).

    ``field`` names the request field at fault; the message says what was wrong, with sizes.
    """

    def __init__(self, message: str, field: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code
