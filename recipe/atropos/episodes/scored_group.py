"""A credited group of episodes as atroposlib's ScoredData: what run-api queues and the trainer pulls.

The trainer's side (trajectory/scored_samples.py) reads it like any Atropos environment's group:
the prompt is the leading run of mask -100; each trained run of the response is matched to the
policy gateway's behaviour records by its exact token ids. The kind and the run's own statistics
ride in ``group_overrides`` (passed through by run-api), so the trainer names per-environment
metrics after the entry whichever run-api serves the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from recipe.atropos.episodes.types import Episode
from recipe.atropos.protocol import IGNORE_INDEX

__all__ = ["ENV_NAME_KEY", "EPISODE_STATS_KEY", "scored_data"]

# group_overrides keys read by the trainer (trajectory/metrics.py).
ENV_NAME_KEY = "env_name"
EPISODE_STATS_KEY = "episode_stats"
# atroposlib's value of inference_logprobs on tokens that were not sampled.
_UNSAMPLED_LOGPROB = 1.0


def scored_data(
    episodes: Sequence[Episode],
    advantages: Sequence[np.ndarray],
    *,
    env_name: str,
    stats: Mapping[str, float] | None = None,
    env_id: int | None = None,
) -> dict[str, Any]:
    """The ScoredData JSON of one group: tokens, masks (the token id where sampled, -100 elsewhere),
    scores (rewards), advantages and inference_logprobs per token, and the group's overrides."""
    if len(advantages) != len(episodes):
        raise ValueError(f"{len(advantages)} advantage rows for {len(episodes)} episodes")
    payload: dict[str, Any] = {
        "tokens": [list(e.token_ids) for e in episodes],
        "masks": [[t if s else IGNORE_INDEX for t, s in zip(e.token_ids, e.sampled_mask)] for e in episodes],
        "scores": [float(e.reward) for e in episodes],
        "advantages": [np.asarray(a, dtype=np.float64).tolist() for a in advantages],
        "inference_logprobs": [[lp if s else _UNSAMPLED_LOGPROB for lp, s in zip(e.logprobs, e.sampled_mask)]
                               for e in episodes],
        "group_overrides": {ENV_NAME_KEY: env_name, EPISODE_STATS_KEY: dict(stats or {})},
    }
    if env_id is not None:
        payload["env_id"] = env_id
    return payload
