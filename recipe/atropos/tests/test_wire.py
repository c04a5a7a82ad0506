"""Round trips of the wire encodings (recipe/atropos/wire.py)."""

import gzip

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recipe.atropos import wire

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
sample_advantage = st.one_of(st.none(), finite, st.lists(finite, max_size=20))


@given(st.lists(sample_advantage, max_size=10), st.sampled_from(wire.SUPPORTED_CONTENT_TYPES))
def test_mixed_advantages_round_trip(advantages, content_type):
    payload = {"advantages": [np.asarray(a, dtype=np.float32) if isinstance(a, list) else a for a in advantages]}
    decoded = wire.decode(wire.encode(payload, content_type), content_type)["advantages"]
    assert len(decoded) == len(advantages)
    for got, want in zip(decoded, advantages):
        if isinstance(want, list):
            np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32))
        else:
            assert got == want


def test_msgpack_carries_arrays_as_arrays_and_keeps_dtype():
    ids = np.arange(5, dtype=np.int64)
    decoded = wire.decode(wire.encode({"ids": [ids]}, wire.MSGPACK), wire.MSGPACK)
    assert isinstance(decoded["ids"][0], np.ndarray) and decoded["ids"][0].dtype == np.int64
    np.testing.assert_array_equal(decoded["ids"][0], ids)


def test_gzip_body_decodes():
    body = gzip.compress(wire.encode({"a": [1, 2]}))
    assert wire.decode(body, wire.JSON, "gzip") == {"a": [1, 2]}


@pytest.mark.parametrize(
    ("body", "content_type", "encoding", "needle"),
    [
        (b"{not json", wire.JSON, None, "JSON"),
        (b"\xc1", wire.MSGPACK, None, "msgpack"),
        (b"not gzip", wire.JSON, "gzip", "gzip"),
        (b"{}", "text/plain", None, "text/plain"),
        (b"{}", wire.JSON, "br", "br"),
    ],
)
def test_bad_bodies_name_the_encoding(body, content_type, encoding, needle):
    with pytest.raises(wire.WireError, match=needle):
        wire.decode(body, content_type, encoding)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("application/msgpack", True),
        ("application/json, application/msgpack;q=0.5", True),
        ("application/msgpack;q=0", False),
        ("application/json", False),
        (None, False),
    ],
)
def test_accept_header(header, expected):
    assert wire.accepts_msgpack(header) is expected
