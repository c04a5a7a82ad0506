"""With fallback on, no answer from the environment service can stop the run; a bad sample costs that sample.

The rule under test (docs/evaluate_mode.md, "How outages are handled"): with `fallback_to_grpo=true`, whatever a
service answers (any JSON or msgpack shape or value, any status) the step trains, on finite
advantages; only a refused API key (401/403) stops the run. A sample whose advantage is unusable
falls back to GRPO alone and is counted under `atropos/fallback_samples/<reason>`; a step that
falls back as a whole is counted under `atropos/fallback/<reason>`.

Everything is real: the fault-injecting HTTP server answers what hypothesis draws, and the real
client, EnvironmentFeedback and AtroposGRPOComputer handle it.
"""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from recipe.atropos import wire
from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.evaluate.feedback import EnvironmentFeedback, EnvironmentServiceError
from recipe.atropos.grpo_computer import AtroposGRPOComputer

from .fault_server import Fault, FaultInjectingServer
from .test_feedback import make_batch

pytestmark = pytest.mark.timeout(600)
EVALUATE = "/evaluate_and_compute_advantages"
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The per-sample reasons docs/evaluate_mode.md documents under atropos/fallback_samples/<reason>.
FALLBACK_SAMPLE_REASONS = ("malformed", "wrong_length", "non_finite", "out_of_range", "invalid_score")


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return PreTrainedTokenizerFast.from_pretrained(tiny_assets.model_dir)


@pytest.fixture(scope="module")
def server():
    with FaultInjectingServer() as running:
        yield running


def make_feedback(server, tokenizer) -> EnvironmentFeedback:
    # One try per call: a drawn 5xx would otherwise retry into the next example's scripted answer.
    config = AtroposTrainerConfig.from_config(
        {"api_url": server.url, "retry_attempts": 1, "retry_delay": 0.0, "max_wait_time": 5.0, "timeout": 5.0}
    )
    return EnvironmentFeedback(config, tokenizer, AtroposGRPOComputer(allow_fallback=True))


def encode_answer(body, encoding: str) -> tuple[bytes, str]:
    """The body as the service would send it; Python's json writes NaN, Infinity and any int."""
    if encoding == wire.MSGPACK:
        try:
            return msgpack.packb(body, use_bin_type=True), wire.MSGPACK
        except (OverflowError, TypeError, ValueError):  # ints beyond 64 bits: JSON carries them
            pass
    return json.dumps(body, allow_nan=True).encode(), wire.JSON


# ---- what a service may answer ---------------------------------------------------------------

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, 3.5e38, FLOAT32_MAX, 1e-320, 0.0, -0.0]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)
token_lists = st.one_of(
    st.lists(numbers, min_size=0, max_size=12),
    st.lists(st.floats(-4, 4), min_size=0, max_size=12),
    st.integers(0, 12).map(lambda n: [0.25] * n),
    st.just([0.5] * 20_000),  # a huge list
    st.lists(st.one_of(st.none(), st.text(max_size=3), st.lists(numbers, max_size=2)), min_size=1, max_size=6),
)
per_sample = st.one_of(st.none(), numbers, token_lists, st.text(max_size=5), json_values)


@st.composite
def near_valid_bodies(draw):
    """The contract's shape with any value in it: fields missing, lists of the wrong length, garbage items."""
    size = draw(st.sampled_from([4, 4, 4, 0, 3, 5]))
    body = {
        "advantages": draw(st.lists(per_sample, min_size=size, max_size=size)),
        "scores": draw(st.one_of(st.lists(numbers, min_size=size, max_size=size), st.lists(scalars, min_size=size, max_size=size), json_values)),
        "metrics": draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=6), json_values, max_size=4), json_values)),
    }
    for key in draw(st.lists(st.sampled_from(list(body)), max_size=3, unique=True)):
        del body[key]
    return body


answers = st.one_of(near_valid_bodies(), near_valid_bodies(), json_values)
statuses = st.sampled_from([200] * 8 + [201, 204, 400, 404, 409, 413, 422, 500, 503, 401, 403])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=answers, encoding=st.sampled_from([wire.JSON, wire.MSGPACK]), status=statuses)
def test_no_answer_stops_the_run_with_fallback_on(server, tokenizer, body, encoding, status):
    raw, content_type = encode_answer(body, encoding)
    server.inject(EVALUATE, Fault(status=status, body=raw, content_type=content_type))
    feedback = make_feedback(server, tokenizer)
    try:
        batch = make_batch(tokenizer)
        feedback.submit(batch, step=1)
        if status in (401, 403):  # a setting to fix, not an outage
            with pytest.raises(EnvironmentServiceError, match="trainer.atropos.api_key"):
                feedback.apply(batch, step=1)
            return
        metrics = feedback.apply(batch, step=1)
    finally:
        feedback.close()
    advantages = batch.batch["advantages"]
    mask = batch.batch["response_mask"].bool()
    assert torch.isfinite(advantages).all()
    assert not advantages[~mask].any()
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    fell_back = sum(metrics[f"atropos/fallback_samples/{r}"] for r in FALLBACK_SAMPLE_REASONS)
    assert metrics["atropos/override_fraction"] * 4 + fell_back <= 4
    step_reasons = [k for k, v in metrics.items() if k.startswith("atropos/fallback/") and v]
    # A step of plain GRPO says why, with exactly one reason.
    assert len(step_reasons) == metrics["atropos/fallback"], (metrics, step_reasons)


# ---- per-sample isolation: the oracle -------------------------------------------------------


def expected_outcome(item, length: int) -> str:
    """What one sample's answer must become: 'override', 'grpo' (null) or the reason it fell back."""
    if item is None:
        return "grpo"
    if isinstance(item, bool) or isinstance(item, str) or isinstance(item, dict):
        return "malformed"
    if isinstance(item, (int, float)):
        value = float(item)
        if not math.isfinite(value):
            return "non_finite"
        return "override" if abs(value) <= FLOAT32_MAX else "out_of_range"
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in item):
        return "malformed"
    if len(item) != length:
        return "wrong_length"
    values = [float(v) for v in item]
    if not all(math.isfinite(v) for v in values):
        return "non_finite"
    return "override" if all(abs(v) <= FLOAT32_MAX for v in values) else "out_of_range"


good_or_bad = st.one_of(
    st.none(),
    st.floats(-4, 4),
    st.sampled_from([float("nan"), float("inf"), 1e300, -1e39, "0.5", True, {"a": 1}]),
    st.just("list"),  # a correct token list, of the sample's length
    st.sampled_from(["list+nan", "list+1e300", "list-short", "list-long", "list+str", "nested"]),
)


def realise(kind, length: int):
    if not isinstance(kind, str) or not kind.startswith(("list", "nested")):
        return kind
    values = [0.1 * (j + 1) for j in range(length)]
    return {
        "list": values,
        "list+nan": values[:-1] + [float("nan")],
        "list+1e300": [1e300] + values[1:],
        "list-short": values[:-1],
        "list-long": values + [0.0],
        "list+str": values[:-1] + ["x"],
        "nested": [[v] for v in values],
    }[kind]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(good_or_bad, min_size=4, max_size=4), scores_ok=st.booleans())
def test_a_bad_sample_costs_that_sample_not_the_step(server, tokenizer, kinds, scores_ok):
    batch = make_batch(tokenizer)
    mask = batch.batch["response_mask"].bool()
    lengths = mask.sum(-1).tolist()
    answer = [realise(kind, n) for kind, n in zip(kinds, lengths)]
    scores = [1.0, 0.0, 1.0, 0.0] if scores_ok else [1.0, float("nan"), "high", None]
    body = {"advantages": answer, "scores": scores, "metrics": {"accuracy": 0.5}}
    server.inject(EVALUATE, Fault(status=200, body=msgpack.packb(body, use_bin_type=True), content_type=wire.MSGPACK))
    feedback = make_feedback(server, tokenizer)
    grpo = batch.batch["advantages"].clone()
    try:
        feedback.submit(batch, step=1)
        metrics = feedback.apply(batch, step=1)
    finally:
        feedback.close()
    outcomes = [expected_outcome(item, n) for item, n in zip(answer, lengths)]
    advantages = batch.batch["advantages"]
    for i, (outcome, item) in enumerate(zip(outcomes, answer)):
        row = advantages[i][mask[i]]
        if outcome == "override":
            expected = torch.tensor(item if isinstance(item, list) else [item] * lengths[i], dtype=torch.float32)
            assert torch.equal(row, expected), (i, outcome)
        else:  # null or fallen back: verl's own GRPO advantage for this sample
            assert torch.allclose(advantages[i], grpo[i]), (i, outcome)
    for reason in FALLBACK_SAMPLE_REASONS:
        assert metrics[f"atropos/fallback_samples/{reason}"] == outcomes.count(reason), (reason, outcomes, metrics)
    assert metrics["atropos/override_fraction"] == outcomes.count("override") / 4
    assert metrics["atropos/fallback"] == (0.0 if "override" in outcomes else 1.0)
    assert metrics["atropos/env/accuracy"] == 0.5  # the answer was used, not thrown away
