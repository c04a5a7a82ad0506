"""Bearer-key checks shared by the HTTP servers of this recipe (environment service, policy gateway).

    refusal = bearer_refusal(authorization_header(scope), expected_key)
    if refusal is not None:  # answer 401 with CHALLENGE_HEADERS, saying the request's key is <refusal>
        ...

The scheme is matched case-insensitively (``bearer``, ``Bearer``, ``BEARER``: RFC 7235 section
2.1), spaces around the credentials are ignored, and the key is compared in constant time
(:func:`hmac.compare_digest`), so the answer's timing does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

__all__ = ["CHALLENGE_HEADERS", "authorization_header", "bearer_refusal"]

# Headers of a 401 answer (RFC 6750 section 3): the client should send a bearer key.
CHALLENGE_HEADERS: dict[str, str] = {"WWW-Authenticate": "Bearer"}

_SCHEME = b"bearer"


def _as_bytes(value: str | bytes) -> bytes:
    # HTTP header values are latin-1 on the wire (ASGI hands them over as such); a key typed in
    # a config may hold anything, so it is compared as UTF-8 bytes and simply never matches then.
    return value if isinstance(value, bytes) else value.encode("utf-8")


def authorization_header(headers: Iterable[tuple[bytes, bytes]] | dict) -> bytes | None:
    """The ``Authorization`` value of an ASGI scope's ``headers`` (or of an ASGI scope itself), or None."""
    if isinstance(headers, dict):  # an ASGI scope
        headers = headers.get("headers", ())
    return next((value for name, value in headers if name.lower() == b"authorization"), None)


def bearer_refusal(authorization: str | bytes | None, expected_key: str | bytes) -> str | None:
    """None when ``authorization`` is ``Bearer <expected_key>`` (scheme in any case), else why not.

    The reason completes "the request's key is ...": ``missing`` (no header or no credentials),
    ``not a Bearer key (scheme 'Basic')``, or ``wrong``. It never repeats the key sent.
    """
    if not authorization:
        return "missing"
    scheme, _, credentials = _as_bytes(authorization).strip().partition(b" ")
    if scheme.lower() != _SCHEME:
        return f"not a Bearer key (scheme {scheme[:20].decode('latin-1')!r})"
    credentials = credentials.strip()
    if not credentials:
        return "missing"
    return None if hmac.compare_digest(credentials, _as_bytes(expected_key)) else "wrong"
