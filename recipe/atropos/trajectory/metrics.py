"""Metrics of one ``GET /batch`` answer (scores, group sizes, overrides), under ``atropos/``.

Staleness is measured from the policy gateway's records (trajectory/staleness.py), not here:
run-api's step counts batches handed out, several at once, and says nothing of the weights that
generated a group.
"""

from __future__ import annotations

import json

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np



def trajectory_metrics(groups: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics of one ``GET /batch`` answer, under ``atropos/``.

    - ``batch_groups``, ``batch_samples``: groups and sequences in the batch;
    - ``mean_score``: mean of every sequence's score;
    - ``identical_score_rate``: fraction of the groups of 2 or more whose scores are all equal
      (0 when there is no such group);
    - ``advantage_groups_fraction``: fraction of groups that carried token-level advantages;
    - ``set_advantage_to_zero_fraction``: fraction of sequences whose group's ``overrides`` asked
      ``set_advantage_to_zero`` (an environment's choice, not how many advantages came out 0);
    - ``group_size/min``, ``group_size/max``: sequences per group (each group is its own GRPO group,
      whatever ``rollout.n`` says).
    """
    scores_G = [_numeric_scores(group) for group in groups]  # what a malformed group holds is skipped
    scores = [s for group_scores in scores_G for s in group_scores]
    multi = [s for s in scores_G if len(s) >= 2]
    identical = sum(1 for s in multi if len(set(s)) == 1)
    with_advantages = sum(1 for group in groups if group.get("advantages"))
    zeroed = sum(
        1 for group in groups for o in _list_or_empty(group.get("overrides")) if isinstance(o, Mapping) and o.get("set_advantage_to_zero")
    )
    metrics = {
        "atropos/batch_groups": float(len(groups)),
        "atropos/batch_samples": float(len(scores)),
        "atropos/mean_score": float(np.mean(scores)) if scores else math.nan,
        "atropos/identical_score_rate": identical / len(multi) if multi else 0.0,
        "atropos/advantage_groups_fraction": with_advantages / len(groups) if groups else 0.0,
        "atropos/set_advantage_to_zero_fraction": zeroed / len(scores) if scores else 0.0,
    }
    sizes = [len(_list_or_empty(group.get("scores"))) for group in groups]
    if sizes:
        metrics["atropos/group_size/min"], metrics["atropos/group_size/max"] = float(min(sizes)), float(max(sizes))
    return metrics


def _list_or_empty(value: Any) -> list:
    return value if isinstance(value, list) else []


def _numeric_scores(group: Any) -> list[float]:
    values = group.get("scores") if isinstance(group, Mapping) else None
    if not isinstance(values, list):
        return []
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


# --------------------------------------------------------------------------------------------
# Per environment (several Atropos environments feeding one run-api)
# --------------------------------------------------------------------------------------------

ENV_METRIC_PREFIX = "atropos/env/"


def env_label(env_id: Any, names: Mapping[int, str] | None = None) -> str:
    """The name a group's ``env_id`` is reported under: its registered name when known, else
    ``env_<id>`` (``unknown`` for a group sent without an id)."""
    if isinstance(env_id, (int, np.integer)) and not isinstance(env_id, bool):
        name = (names or {}).get(int(env_id))
        return _metric_safe(name) if name else f"env_{int(env_id)}"
    if isinstance(env_id, str) and env_id:  # an episode runner's entry name (group_overrides.env_name)
        return _metric_safe(env_id)
    return "unknown"


# An episode runner's statistics (recipe/atropos/episodes/loop.py EpisodeStats.take): these are
# per-group means, averaged over the step's groups; every other number is a counter since the
# runner's previous group (episodes, failures, failures/<kind>, dropped_groups, and a kind's own, e.g.
# OpenEnv's parse_failures), summed over the step.
_AVERAGED_EPISODE_STATS = {"turns_mean": "turns_per_episode", "tokens_mean": "tokens_per_episode",
                           "group_reward_mean": "reward"}
_ALWAYS_REPORTED = ("episodes", "failures", "dropped_groups")


def episode_metrics(env_id_B: Sequence[Any], stats_json_B: Sequence[str]) -> dict[str, float]:
    """``atropos/env/<name>/...`` from the episode runners' statistics that came with this step's groups
    (one JSON object on each group's first row): the counters summed (``episodes``, ``failures``,
    ``failures/<kind>``, ``dropped_groups`` and the kind's own), ``turns_per_episode``,
    ``tokens_per_episode`` (sampled tokens) and ``reward`` (the group's mean) averaged over groups."""
    summed: dict[str, dict[str, float]] = {}
    averaged: dict[str, dict[str, list[float]]] = {}
    for env_id, text in zip(env_id_B, stats_json_B):
        if not text:
            continue
        label = env_label(env_id)
        into = summed.setdefault(label, dict.fromkeys(_ALWAYS_REPORTED, 0.0))
        means = averaged.setdefault(label, {name: [] for name in _AVERAGED_EPISODE_STATS.values()})
        for key, value in json.loads(text).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if key in _AVERAGED_EPISODE_STATS:
                means[_AVERAGED_EPISODE_STATS[key]].append(float(value))
            else:
                into[key] = into.get(key, 0.0) + float(value)
    metrics = {f"{ENV_METRIC_PREFIX}{label}/{_metric_path(key)}": value
               for label, values in summed.items() for key, value in values.items()}
    metrics.update({f"{ENV_METRIC_PREFIX}{label}/{key}": float(np.mean(v)) for label, values in averaged.items()
                    for key, v in values.items() if v})
    return metrics


def _metric_path(key: str) -> str:
    # A counter's key may have one level (failures/<kind>); each part is made metric-safe.
    return "/".join(_metric_safe(part) for part in str(key).split("/"))


def environment_metrics(
    env_id_B: Sequence[Any],
    score_B: Sequence[float],
    advantage_B: Sequence[float] | None = None,
    names: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """Per environment, under ``atropos/env/<name>/``, from one step's rows (one row per sequence):

    - ``batch_share``: its fraction of the step's sequences (what run-api's weights and
      ``min_batch_allocation`` steer);
    - ``samples``: its sequences this step;
    - ``mean_score``: mean score of its sequences;
    - ``advantage_mean``, ``advantage_abs_mean``: mean of each sequence's (token-mean) advantage, as
      trained, and of its magnitude (0 for a group whose scores were all equal).

    ``names`` maps run-api's ``env_id`` to the environment's registered name (``desired_name``);
    several registrations of one name (a restarted environment) are reported together.
    """
    labels = [env_label(e, names) for e in env_id_B]
    scores = np.asarray(score_B, dtype=np.float64)
    advantages = None if advantage_B is None else np.asarray(advantage_B, dtype=np.float64)
    total = len(labels)
    metrics: dict[str, float] = {}
    for label in sorted(set(labels)):
        rows = np.array([lab == label for lab in labels])
        prefix = f"{ENV_METRIC_PREFIX}{label}/"
        metrics[prefix + "batch_share"] = float(rows.sum()) / total
        metrics[prefix + "samples"] = float(rows.sum())
        metrics[prefix + "mean_score"] = _finite_mean(scores[rows])
        if advantages is not None:
            metrics[prefix + "advantage_mean"] = _finite_mean(advantages[rows])
            metrics[prefix + "advantage_abs_mean"] = _finite_mean(np.abs(advantages[rows]))
    return metrics


def _finite_mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _metric_safe(name: str) -> str:
    # A metric key's path segment: '/' would split it into two levels in every logger.
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in str(name)) or "unnamed"
