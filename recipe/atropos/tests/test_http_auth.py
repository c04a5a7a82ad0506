"""The shared bearer-key check (recipe/atropos/http_auth.py), on its own; the services' use of it
is tested through real servers in test_env_service.py and test_policy_gateway.py."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from recipe.atropos.http_auth import CHALLENGE_HEADERS, authorization_header, bearer_refusal

KEY = "s3cret-key"
_token_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7E)  # visible ASCII: what a key holds


@given(key=st.text(_token_chars, min_size=1, max_size=64), flips=st.lists(st.booleans(), min_size=6, max_size=6))
def test_the_right_key_passes_with_the_scheme_in_any_case(key, flips):
    scheme = "".join(c.upper() if flip else c for c, flip in zip("bearer", flips))
    assert bearer_refusal(f"{scheme} {key}", key) is None
    assert bearer_refusal(f"  {scheme}   {key}  ".encode(), key) is None  # bytes, as ASGI gives them


@given(key=st.text(_token_chars, min_size=1, max_size=64), sent=st.text(_token_chars, min_size=1, max_size=64))
def test_any_other_key_is_wrong(key, sent):
    if sent != key:
        assert bearer_refusal(f"Bearer {sent}", key) == "wrong"


def test_missing_and_foreign_schemes_are_named():
    assert bearer_refusal(None, KEY) == "missing"
    assert bearer_refusal(b"", KEY) == "missing"
    assert bearer_refusal("Bearer ", KEY) == "missing"
    assert bearer_refusal(f"Basic {KEY}", KEY) == "not a Bearer key (scheme 'Basic')"
    assert bearer_refusal(KEY, KEY).startswith("not a Bearer key")  # the key alone, no scheme
    assert KEY not in bearer_refusal(f"Token {KEY}", KEY)


def test_header_lookup_and_challenge():
    scope = {"type": "http", "headers": [(b"accept", b"*/*"), (b"authorization", b"bearer k")]}
    assert authorization_header(scope) == b"bearer k"
    assert authorization_header(scope["headers"]) == b"bearer k"
    assert authorization_header({"headers": []}) is None
    assert CHALLENGE_HEADERS == {"WWW-Authenticate": "Bearer"}
