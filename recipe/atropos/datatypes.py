"""Types that cross module borders and are not wire models (those are in :mod:`recipe.atropos.protocol`).

(Not ``types.py``: a script run by path from this folder, such as
``launch_atropos_verl_services.py``, would shadow the standard library's ``types`` with it.)

Small frozen dataclasses with numpy arrays, never raw JSON. Shape suffixes: ``_B`` one entry per
sample, ``_T`` per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ClientStats",
    "EvaluationRequest",
    "EvaluationResult",
    "GroupId",
    "InferenceEndpoint",
    "InvalidSample",
    "SampleAdvantage",
    "TrajectoryInfo",
    "TrajectoryStatus",
    "group_index",
]

GroupId = str | int
# One sample's advantage as an environment returns it: a token list (float32 [T]), one float
# broadcast over the response, or None (no override: the trainer computes standard GRPO for it).
SampleAdvantage = np.ndarray | float | None


def group_index(group_ids: Sequence[object]) -> np.ndarray:
    """Dense group number of each sample (0..G-1, in order of first appearance), int64 [B].

    The protocol's grouping rule: ids compare by their string form (verl's uids are strings).
    Hashed, not sorted.
    """
    import pandas as pd  # only the environment side needs it

    labels = np.asarray([str(g) for g in group_ids], dtype=object)
    codes, _ = pd.factorize(labels, use_na_sentinel=False)
    return codes.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# The evaluate protocol, both sides
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvaluationRequest:
    """One evaluation request, validated (:func:`recipe.atropos.protocol.parse_evaluate_request`).

    Every per-sample list has B entries. ``group_ids`` and ``ground_truths`` are resolved (prompt
    text when no group ids were sent; None per sample when no ground truths were sent).
    ``response_token_ids``: B int32 arrays [T_i], or None when not sent. ``response_lengths_B``:
    int64 [B], known when the request sent token ids or lengths (then token-level advantages may
    be returned). ``metadata``: the request's free-form object.
    """

    prompts: list[str]
    responses: list[str]
    group_ids: list[GroupId]
    ground_truths: list[str | None]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    response_token_ids: list[np.ndarray] | None = None
    response_lengths_B: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def lengths_known(self) -> bool:
        return self.response_lengths_B is not None

    def group_index_B(self) -> np.ndarray:
        """Dense group index of each sample, int64 [B] (see :func:`group_index`)."""
        return group_index(self.group_ids)


@dataclasses.dataclass(frozen=True)
class InvalidSample:
    """One sample's part of an answer that breaks the contract, kept in place of the value.

    A bad sample must cost that sample only, so the client does not reject the whole answer for
    it: the caller decides (fall back for that sample, or stop when fallback is off). ``reason``
    is a short key for metrics (``malformed``, ``non_finite``, ``out_of_range``, ...),
    ``message`` says which field and value.
    """

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """The validated answer of ``/evaluate_and_compute_advantages`` for a batch of B samples (client side).

    ``advantages[i]`` is a float32 array with one value per response token, a float (a sequence
    level advantage to broadcast), None (compute standard GRPO for that sample) or an
    :class:`InvalidSample`. Whether a token array's length matches the sample's response is checked
    by the caller, which can fall back per sample. ``scores`` is a float64 array of shape (B,), NaN
    where ``invalid_scores`` holds why the score was unusable. ``metrics`` the environment's
    numeric metrics (``ignored_metrics`` names those that were not numbers), ``raw`` the decoded
    answer as received.
    """

    advantages: list[np.ndarray | float | None | InvalidSample]
    scores: np.ndarray
    metrics: dict[str, float]
    raw: dict[str, Any]
    invalid_scores: dict[int, InvalidSample] = dataclasses.field(default_factory=dict)
    ignored_metrics: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class InferenceEndpoint:
    """An OpenAI-compatible server registered through ``POST /register_inference_endpoint``."""

    base_url: str
    model: str
    api_key: str | None = None

    def public(self) -> dict[str, Any]:
        """What ``/health`` may show: never the key itself."""
        return {"base_url": self.base_url, "model": self.model, "api_key_set": self.api_key is not None}


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientStats:
    """Counters since a client was created, for the trainer's metrics.

    ``requests`` counts calls (however many attempts each took), ``retries`` the attempts after
    the first, ``failures`` the calls that raised (or a health check that found the service
    down). Latencies are of successful calls, retries and waits included.
    """

    requests: int = 0
    retries: int = 0
    failures: int = 0
    last_latency_s: float = 0.0
    mean_latency_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrajectoryStatus:
    """``GET /status`` of the trajectory API: the trainer step it counts and groups queued."""

    current_step: int
    queue_size: int


@dataclasses.dataclass(frozen=True)
class TrajectoryInfo:
    """``GET /info`` of the trajectory API; both are -1 until a trainer registered."""

    batch_size: int
    max_token_len: int
