"""The environment interface: one small class per environment, hosted by the generic service.

An environment judges a batch of responses and turns the judgement into advantages:

    request -> check_request -> score -> compute_advantages -> metrics -> EvaluateResponse

:meth:`Environment.evaluate` runs those steps; a subclass writes :meth:`score` and
:meth:`compute_advantages` (and may extend :meth:`metrics`, :meth:`check_request`, :meth:`setup`).
Its options are a pydantic model (:attr:`Environment.Config`), which the service turns into
``--env.<field>`` command-line flags. Everything crossing the module border is a typed dataclass
with numpy arrays (:mod:`recipe.atropos.datatypes`) or a wire model (:mod:`recipe.atropos.protocol`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from recipe.atropos.datatypes import EvaluationRequest, GroupId, InferenceEndpoint, SampleAdvantage
from recipe.atropos.errors import ContractError
from recipe.atropos.protocol import EvaluateResponse, evaluate_response

# What an environment author needs, in one import.
__all__ = [
    "ContractError",
    "EnvConfig",
    "Environment",
    "EvaluationRequest",
    "GroupId",
    "InferenceEndpoint",
    "SampleAdvantage",
    "ScoredBatch",
    "group_score_metrics",
]


class EnvConfig(BaseModel):
    """Base of an environment's options; each field becomes a ``--env.<field>`` flag.

    Give every field a ``description``: it is the flag's ``--help`` text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclasses.dataclass
class ScoredBatch:
    """What :meth:`Environment.score` found: the reward of each sample and per-sample details.

    ``infos[i]`` is environment specific (e.g. the extracted answer, its step rewards); it stays
    on the service side and feeds :meth:`Environment.compute_advantages` and :meth:`Environment.metrics`.
    """

    scores_B: np.ndarray  # float64 [B]
    infos: list[dict[str, Any]]


def group_score_metrics(scores_B: np.ndarray, group_index_B: np.ndarray) -> dict[str, float]:
    """Metrics every environment reports.

    - ``mean_reward``: mean score over the batch.
    - ``num_groups``: number of GRPO groups.
    - ``identical_score_group_rate``: among groups of at least 2 samples, the fraction whose scores
      are all equal (their outcome advantages are all 0: no learning signal); 0.0 when there is none.
    """
    num_groups = int(group_index_B.max()) + 1 if group_index_B.size else 0
    count_G = np.bincount(group_index_B, minlength=num_groups)
    max_G = np.full(num_groups, -np.inf)
    min_G = np.full(num_groups, np.inf)
    np.maximum.at(max_G, group_index_B, scores_B)
    np.minimum.at(min_G, group_index_B, scores_B)
    multi_G = count_G >= 2
    identical = float(np.mean(max_G[multi_G] == min_G[multi_G])) if multi_G.any() else 0.0
    return {
        "mean_reward": float(np.mean(scores_B)) if scores_B.size else 0.0,
        "num_groups": float(num_groups),
        "identical_score_group_rate": identical,
    }


class Environment(abc.ABC):
    """One environment: judges responses, computes their advantages, reports metrics.

    Subclasses set :attr:`name` and :attr:`Config` and implement :meth:`score` and
    :meth:`compute_advantages`. The service runs up to :attr:`max_concurrent_evaluations`
    evaluations at once, each on its own thread: with the default of 1 they run one after another
    (on the main thread under ``serve``) and caches need no locks.
    """

    name: ClassVar[str]
    Config: ClassVar[type[EnvConfig]] = EnvConfig
    # More than 1 only for environments whose evaluate() is thread-safe (an unrelated request then
    # need not wait behind a slow one).
    max_concurrent_evaluations: ClassVar[int] = 1

    def __init__(self, config: EnvConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.inference_endpoint: InferenceEndpoint | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def setup(self) -> None:
        """Load what evaluation needs (tokenizers, data, warm caches). The service answers 503 until it returns."""

    def close(self) -> None:
        """Release what :meth:`setup` started (worker processes, connections); called at shutdown."""

    def describe(self) -> dict[str, Any]:
        """What ``/health`` shows about this environment (its options by default)."""
        return {"config": self.config.model_dump(mode="json")}

    def set_inference_endpoint(self, endpoint: InferenceEndpoint) -> None:
        """Called by ``POST /register_inference_endpoint``; environments that call a model use it."""
        self.inference_endpoint = endpoint

    # ---- evaluation ---------------------------------------------------------------------

    def required_request_fields(self) -> frozenset[str]:
        """Optional request fields this environment needs, non-null for every sample
        (``ground_truths``, ``response_token_ids``): the service's OpenAPI schema marks them
        required, so schema-driven clients send them. :meth:`check_request` still enforces them."""
        return frozenset()

    def check_request(self, request: EvaluationRequest) -> None:
        """Raise :class:`ContractError` (HTTP 422) for requests this environment cannot judge."""

    @abc.abstractmethod
    def score(self, request: EvaluationRequest) -> ScoredBatch:
        """The reward of each sample, plus per-sample details for the next steps."""

    @abc.abstractmethod
    def compute_advantages(self, request: EvaluationRequest, scored: ScoredBatch) -> list[SampleAdvantage]:
        """B advantages: a float32 token array of the sample's response length, a float, or None."""

    def metrics(self, request: EvaluationRequest, scored: ScoredBatch) -> dict[str, float]:
        """Request-level metrics (numbers only); see :func:`group_score_metrics` for the common ones."""
        return group_score_metrics(scored.scores_B, request.group_index_B())

    def evaluate(self, request: EvaluationRequest) -> EvaluateResponse:
        """check_request -> score -> compute_advantages -> metrics, with the result's sizes checked."""
        self.check_request(request)
        scored = self.score(request)
        advantages = self.compute_advantages(request, scored)
        _check_result_sizes(request, scored.scores_B, advantages, self.name)
        return evaluate_response(scored.scores_B, advantages, self.metrics(request, scored))


def _check_result_sizes(
    request: EvaluationRequest, scores_B: np.ndarray, advantages: Sequence[SampleAdvantage], env_name: str
) -> None:
    """An environment bug must not reach the trainer as a silently misaligned batch."""
    batch_size = request.batch_size
    if scores_B.shape != (batch_size,) or len(advantages) != batch_size:
        raise RuntimeError(
            f"environment {env_name!r} returned {scores_B.shape} scores and {len(advantages)} advantages "
            f"for {batch_size} samples"
        )
    if request.response_lengths_B is None:
        return
    for index, advantage in enumerate(advantages):
        if isinstance(advantage, np.ndarray) and advantage.shape != (int(request.response_lengths_B[index]),):
            raise RuntimeError(
                f"environment {env_name!r} returned {advantage.shape} token advantages for sample {index} "
                f"of {int(request.response_lengths_B[index])} response tokens"
            )
