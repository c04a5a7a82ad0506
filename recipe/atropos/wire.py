"""Wire encodings of the environment-service protocol (docs/PROTOCOL.md).

JSON is always spoken. The compact encoding is msgpack (``application/msgpack``) in which every
numeric list of a sample (response token ids, token-level advantages) travels as one msgpack
extension holding the raw little-endian array: a batch of 1024 x 2048 advantages is one memcpy
per sample instead of two million float objects. Decoding gives numpy arrays for those fields;
everything else (scalars, strings, None) is plain msgpack.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import orjson

JSON = "application/json"
MSGPACK = "application/msgpack"
GZIP = "gzip"
SUPPORTED_CONTENT_TYPES = (JSON, MSGPACK)

# msgpack extension codes: the payload is the array's little-endian bytes.
_EXT_FLOAT32 = 1
_EXT_INT32 = 2
_EXT_FLOAT64 = 3
_EXT_INT64 = 4
_EXT_BY_DTYPE = {
    np.dtype("<f4"): _EXT_FLOAT32,
    np.dtype("<i4"): _EXT_INT32,
    np.dtype("<f8"): _EXT_FLOAT64,
    np.dtype("<i8"): _EXT_INT64,
}
_DTYPE_BY_EXT = {code: dtype for dtype, code in _EXT_BY_DTYPE.items()}


class WireError(ValueError):
    """A body that cannot be decoded in the encoding it claims."""


def media_type(header_value: str | None) -> str:
    """``'application/json; charset=utf-8'`` -> ``'application/json'`` (JSON when absent)."""
    if not header_value:
        return JSON
    return header_value.split(";", 1)[0].strip().lower()


def accepts_msgpack(accept_header: str | None) -> bool:
    """True when an ``Accept`` header lists msgpack (any q > 0)."""
    return header_lists(accept_header, MSGPACK)


def header_lists(header_value: str | None, token: str) -> bool:
    """True when a negotiation header (``Accept``, ``Accept-Encoding``) lists `token` with q > 0."""
    for part in (header_value or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        if fields[0].lower() != token:
            continue
        q = next((f[2:] for f in fields[1:] if f.startswith("q=")), "1")
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.ndim != 1:
            raise TypeError(f"only 1-D arrays go on the wire, got shape {obj.shape}")
        dtype = obj.dtype.newbyteorder("<")
        if dtype not in _EXT_BY_DTYPE:
            dtype = np.dtype("<f4") if obj.dtype.kind == "f" else np.dtype("<i8")
        return msgpack.ExtType(_EXT_BY_DTYPE[dtype], np.ascontiguousarray(obj, dtype=dtype).tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _msgpack_ext_hook(code: int, data: bytes) -> Any:
    dtype = _DTYPE_BY_EXT.get(code)
    if dtype is None:
        return msgpack.ExtType(code, data)
    if len(data) % dtype.itemsize:
        raise WireError(f"array extension {code}: {len(data)} bytes is not a multiple of {dtype.itemsize}")
    # frombuffer is read-only and zero-copy; the consumers only read.
    return np.frombuffer(data, dtype=dtype)


def encode(payload: Mapping[str, Any], content_type: str = JSON) -> bytes:
    """Encode a payload. numpy arrays are allowed anywhere (lists in JSON, raw arrays in msgpack)."""
    if content_type == MSGPACK:
        return msgpack.packb(payload, default=_msgpack_default, use_bin_type=True)
    if content_type == JSON:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY, default=_json_default)
    raise WireError(f"unsupported content type {content_type!r}; supported: {', '.join(SUPPORTED_CONTENT_TYPES)}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # non-contiguous or exotic dtypes orjson refuses
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode(body: bytes, content_type: str = JSON, content_encoding: str | None = None) -> Any:
    """Decode a body; raises WireError naming the encoding when it is not valid."""
    if content_encoding and content_encoding.strip().lower() == GZIP:
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise WireError(f"body is not valid gzip: {exc}") from exc
    elif content_encoding and content_encoding.strip().lower() not in ("identity", ""):
        raise WireError(f"unsupported Content-Encoding {content_encoding!r}; supported: gzip, identity")
    if content_type == MSGPACK:
        try:
            return msgpack.unpackb(body, ext_hook=_msgpack_ext_hook, raw=False, strict_map_key=False)
        except WireError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise WireError(f"body is not valid msgpack: {exc}") from exc
    if content_type == JSON:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise WireError(f"body is not valid JSON: {exc}") from exc
    raise WireError(f"unsupported content type {content_type!r}; supported: {', '.join(SUPPORTED_CONTENT_TYPES)}")


MAX_TOKEN_ID = int(np.iinfo(np.int32).max)  # token ids travel as int32


def token_id_array(ids: Any) -> np.ndarray:
    """One sample's token ids (a list, tuple or array of int) as a 1-D int32 array, type and range
    checked without a Python loop. ValueError says what is wrong, for the caller to name the field."""
    if not isinstance(ids, (list, tuple, np.ndarray)) and not hasattr(ids, "__array__"):
        raise ValueError(f"expected a list of int, got {type(ids).__name__}")
    try:
        array = np.asarray(ids)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"expected a flat list of int ({exc})") from exc
    if array.size == 0 and array.ndim == 1:
        return np.zeros(0, dtype=np.int32)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"expected a flat list of int, got {array.ndim}-d values of type {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > MAX_TOKEN_ID:
        raise ValueError(f"token ids must lie in [0, {MAX_TOKEN_ID}], got [{low}, {high}]")
    return array.astype(np.int32, copy=False)


def type_name(value: Any) -> str:
    """How a decoded value is named in error messages: ``null``, ``str``, ``array of float32 with shape (3,)``."""
    if value is None:
        return "null"
    if isinstance(value, np.ndarray):
        return f"array of {value.dtype} with shape {value.shape}"
    return type(value).__name__
