"""Request and answer bodies of the service: limits, encodings, and the protocol's error shape.

Bodies arrive as JSON or msgpack (by ``Content-Type``; anything not msgpack is read as JSON, so
``curl -d`` works), optionally gzip (``Content-Encoding``). Answers are msgpack when ``Accept``
lists it (token arrays as raw float32 bytes, see :mod:`recipe.atropos.wire`), JSON otherwise,
gzip-compressed only when JSON, large, and asked for by ``Accept-Encoding``.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from recipe.atropos import wire

# Below this a gzip'ed JSON answer saves less than it costs; msgpack float arrays never shrink enough.
GZIP_MIN_BYTES = 64 * 1024
RETRY_AFTER_S = "1"
CLIENT_GONE_STATUS = 499  # nginx's "client closed request": an answer nobody reads


class ServiceError(Exception):
    """An error answer: HTTP status, short code, message (what was wrong, with field and sizes)."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def shutting_down(message: str = "the service is shutting down") -> ServiceError:
    return ServiceError(503, "shutting_down", message, {"Retry-After": RETRY_AFTER_S})


class ClientGone(Exception):
    """The client disconnected before its answer was ready (while sending its body, or waiting)."""


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """The protocol's error shape, always JSON."""
    body = wire.encode({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type=wire.JSON, headers=dict(headers or {}))


def gunzip_limited(body: bytes, limit: int) -> bytes:
    """Decompress a gzip body, refusing (413) to inflate past ``limit`` bytes (a gzip bomb is tiny)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ServiceError(400, "malformed_body", f"body is not valid gzip: {exc}") from exc
    if len(data) > limit:
        raise ServiceError(413, "payload_too_large", f"body inflates past this service's limit of {limit} bytes")
    if not inflater.eof:
        raise ServiceError(400, "malformed_body", "body is not valid gzip: truncated stream")
    return data


def decode_body(body: bytes, content_type: str | None, content_encoding: str | None, limit: int) -> Any:
    """Bytes -> Python objects: msgpack when the Content-Type says so, JSON otherwise; gzip undone."""
    encoding = (content_encoding or "").strip().lower()
    if encoding == wire.GZIP:
        body = gunzip_limited(body, limit)
    elif encoding not in ("", "identity"):
        raise ServiceError(400, "malformed_body", f"unsupported Content-Encoding {encoding!r}; supported: gzip, identity")
    media = wire.MSGPACK if wire.media_type(content_type) == wire.MSGPACK else wire.JSON
    if not body:
        raise ServiceError(400, "malformed_body", f"empty body; expected {media}")
    try:
        return wire.decode(body, media)
    except wire.WireError as exc:
        raise ServiceError(400, "malformed_body", str(exc)) from exc
    except RecursionError as exc:  # absurdly nested arrays
        raise ServiceError(400, "malformed_body", "body is nested too deeply") from exc


@dataclasses.dataclass
class Encoded:
    """An encoded answer, ready to send."""

    body: bytes
    media_type: str
    headers: dict[str, str]

    def response(self) -> Response:
        return Response(self.body, media_type=self.media_type, headers=self.headers)


def encode_answer(payload: Mapping[str, Any], accept: str | None, accept_encoding: str | None) -> Encoded:
    """msgpack when Accept lists it; else JSON, gzip'ed when large and the client accepts gzip."""
    if wire.accepts_msgpack(accept):
        return Encoded(wire.encode(payload, wire.MSGPACK), wire.MSGPACK, {"Vary": "Accept, Accept-Encoding"})
    body = wire.encode(payload, wire.JSON)
    headers = {"Vary": "Accept, Accept-Encoding"}
    if len(body) >= GZIP_MIN_BYTES and wire.header_lists(accept_encoding, "gzip"):
        body = gzip.compress(body, compresslevel=1)  # level 1: most of the gain at a fraction of the time
        headers["Content-Encoding"] = wire.GZIP
    return Encoded(body, wire.JSON, headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it (or its declared length) passes ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServiceError(
            413, "payload_too_large", f"body of {int(declared)} bytes is over this service's limit of {limit} bytes"
        )
    chunks = bytearray()
    try:
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                raise ServiceError(413, "payload_too_large", f"body is over this service's limit of {limit} bytes")
    except ClientDisconnect as exc:  # an ordinary client timeout mid-upload, not the service's failure
        raise ClientGone from exc
    return bytes(chunks)
