"""Reading a run's metrics (verl's file logger JSONL): per-step lines, a summary, and the reward plot."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterator

REWARD = "critic/score/mean"  # verl's mean sequence score: the environment-independent reward
ACCURACY = "atropos/env/accuracy"
FALLBACK = "atropos/fallback"
# Per environment (several in one run, docs/many_environments.md): atropos/env/<name>/<metric>. The
# reward curve of an environment is the first of these it logs.
ENV_PREFIX = "atropos/env/"
ENV_REWARD_METRICS = ("mean_score", "reward/mean", "score/mean")
# verl's validation (trainer.val_before_train, trainer.test_freq): the mean score of each data source's
# held-out prompts, val-core/<data_source>/<acc, or reward without an acc>/mean@<val_kwargs.n>.
HELD_OUT_KEY = re.compile(r"^val-core/(?P<source>.+)/(?:acc|reward)/mean@\d+$")
# The demo validates every HELDOUT_EVERY steps (trainer.test_freq) and at the last step S. "After training"
# is the mean held-out score of the validations in the second half of the run (steps >= S/2: 30, 40 and
# 50 of the demo's 50). A single checkpoint's greedy accuracy swings by up to 0.15 from one validation to
# the next as greedy answers flip format together; three 10 steps apart average that out.
HELDOUT_EVERY = 10
# --check: the least held-out gain (after training minus before) that counts as learned. With greedy
# validation the held-out score is a function of the weights alone: with the learning rate 0 the gain is
# exactly 0.000 (4 runs, 30-60 steps), so the check fails. The demo's 50 steps, ten runs as it ships
# (docs/cpu_mode.md#did-it-learn): +0.074 to +0.161, mean 0.126, sd 0.031; ten seeds +0.078 to +0.169.
# 0.01 (5 of 512 prompts) is 3.7 sd below the mean: a false failure of 1e-4 under a normal fit, 3e-4
# under the predictive t of all twenty runs (19 df, allowing for the sd's own uncertainty).
MIN_HELDOUT_GAIN = 0.01
# The per-step timing breakdown, as verl (timing_s/...) and the trainer (atropos/...) log it.
TIMING_KEYS = {
    "generation": "timing_s/gen",
    "old log-prob": "timing_s/old_log_prob",
    "advantage": "timing_s/adv",
    "actor update": "timing_s/update_actor",
    "weight sync": "timing_s/update_weights",
    "environment call": "atropos/api_latency_s",
    "waited for environment": "atropos/wait_s",
    "step": "timing_s/step",
}


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON Lines file. Lines end at "\n" only: str.splitlines() would also split
    inside a string holding U+2028, U+0085 or another break that a model's text can contain and
    json.dumps(ensure_ascii=False) writes as it is."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def read_steps(path: str | Path) -> list[dict]:
    """Training steps of a verl file-logger JSONL, in order (validation-only lines are skipped)."""
    steps = {}
    for record in read_jsonl(path):
        data = record["data"]
        if REWARD in data or "timing_s/step" in data:
            steps[record["step"]] = {"step": record["step"], **data}
    return [steps[k] for k in sorted(steps)]


def held_out_score(data: dict) -> float | None:
    """The held-out score of one metrics record: the mean over data sources of verl's val-core mean;
    None for a record without validation."""
    scores = [float(v) for k, v in data.items() if HELD_OUT_KEY.match(k)]
    return sum(scores) / len(scores) if scores else None


def read_validation(path: str | Path) -> dict[int, float]:
    """{step: held-out score} of a verl file-logger JSONL; step 0 is the validation before training."""
    scores = {}
    for record in read_jsonl(path):
        score = held_out_score(record["data"])
        if score is not None:
            scores[record["step"]] = score
    return dict(sorted(scores.items()))


class StepFollower:
    """Yields the training steps a growing metrics file gains since the last call (with
    ``validation=True`` also step 0's validation before training, which has no reward)."""

    def __init__(self, path: str | Path, validation: bool = False):
        self.path = Path(path)
        self.validation = validation
        self._offset = 0

    def new_steps(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete, _, _ = chunk.rpartition(b"\n")
        if not complete:
            return
        self._offset += len(complete) + 1
        for line in complete.decode().splitlines():
            record = json.loads(line)
            if REWARD in record["data"] or (self.validation and held_out_score(record["data"]) is not None):
                yield {"step": record["step"], **record["data"]}


def environment_rewards(step: dict) -> dict[str, float]:
    """{environment name: its reward this step}, from ``atropos/env/<name>/<metric>`` keys (the first
    metric of :data:`ENV_REWARD_METRICS` each environment logs); {} for a one-environment run."""
    rewards: dict[str, float] = {}
    for metric in ENV_REWARD_METRICS:
        suffix = "/" + metric
        for key, value in step.items():
            if key.startswith(ENV_PREFIX) and key.endswith(suffix):
                name = key[len(ENV_PREFIX) : -len(suffix)]
                if name and "/" not in name and isinstance(value, (int, float)):
                    rewards.setdefault(name, float(value))
    return dict(sorted(rewards.items()))


def environment_names(steps: list[dict]) -> list[str]:
    """Every environment any step reports a reward for, sorted."""
    return sorted({name for step in steps for name in environment_rewards(step)})


def format_step(step: dict, total_steps: int | None = None) -> str:
    of = f"/{total_steps}" if total_steps else ""
    held_out = held_out_score(step)
    if REWARD not in step and held_out is not None:
        return f"step {step['step']:>3}{of} | held-out accuracy {held_out:.3f} (greedy, before training)"
    parts = [f"step {step['step']:>3}{of}", f"reward {step.get(REWARD, float('nan')):.3f}"]
    parts += [f"{name} {value:.3f}" for name, value in environment_rewards(step).items()]
    if ACCURACY in step:
        parts.append(f"accuracy {step[ACCURACY]:.3f}")
    if FALLBACK in step:
        parts.append("fallback GRPO" if step[FALLBACK] else "env advantages")
    if "timing_s/step" in step:
        parts.append(f"{step['timing_s/step']:.2f}s")
    if held_out is not None:
        parts.append(f"held-out accuracy {held_out:.3f}")
    return " | ".join(parts)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    steps: int
    reward_first: float  # mean over the first `window` steps (sampled, temperature 1)
    reward_last: float  # mean over the last `window` steps
    accuracy_first: float
    accuracy_last: float
    fallback_steps: int
    timing_s: dict[str, float]  # mean per step, after the first step (which includes warm-up)
    window: int
    # Greedy held-out score (verl's validation, :func:`read_validation`) before training (step 0) and
    # after (the mean over the validations of the run's second half); NaN when not validated.
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")
    heldout_after_steps: tuple[int, ...] = ()

    @property
    def heldout_gain(self) -> float:
        return self.heldout_after - self.heldout_before

    @property
    def improved(self) -> bool:
        """Learned: the held-out score gained at least :data:`MIN_HELDOUT_GAIN` (False when unmeasured)."""
        return self.heldout_gain >= MIN_HELDOUT_GAIN

    def lines(self) -> list[str]:
        if math.isnan(self.heldout_gain):
            held_out = "held-out accuracy: not measured (needs trainer.val_before_train=true and trainer.test_freq > 0)"
        else:
            verdict = "learned" if self.improved else f"did not learn: needs +{MIN_HELDOUT_GAIN:.3f}"
            at = ", ".join(map(str, self.heldout_after_steps))
            held_out = (f"held-out accuracy (greedy) before: {self.heldout_before:.3f}  after (steps {at}): "
                        f"{self.heldout_after:.3f}  ({self.heldout_gain:+.3f}, {verdict})")
        return [
            f"steps: {self.steps}, fell back to GRPO on {self.fallback_steps}",
            held_out,
            f"reward   first {self.window}: {self.reward_first:.3f}  last {self.window}: {self.reward_last:.3f}  (sampled)",
            f"accuracy first {self.window}: {self.accuracy_first:.3f}  last {self.window}: {self.accuracy_last:.3f}",
            "mean seconds per step (after the first): "
            + ", ".join(f"{name} {value:.3f}" for name, value in self.timing_s.items() if not math.isnan(value)),
        ]


def summarize(steps: list[dict], window: int = 5, validation: dict[int, float] | None = None) -> RunSummary:
    """The run in a few numbers; ``validation`` (:func:`read_validation`) gives the held-out scores."""
    if not steps:
        raise ValueError("no training step was logged")
    first, last = steps[:window], steps[-window:]
    warm = steps[1:] or steps
    validation = validation or {}
    last_step = steps[-1]["step"]
    # After training: the validations of the run's second half, the last step's among them.
    after = [step for step in validation if max(1, last_step / 2) <= step <= last_step]
    if last_step not in after:
        after = []
    return RunSummary(
        steps=len(steps),
        reward_first=_mean([s.get(REWARD) for s in first]),
        reward_last=_mean([s.get(REWARD) for s in last]),
        accuracy_first=_mean([s.get(ACCURACY) for s in first]),
        accuracy_last=_mean([s.get(ACCURACY) for s in last]),
        fallback_steps=int(sum(s.get(FALLBACK, 0) for s in steps)),
        timing_s={name: _mean([s.get(key) for s in warm]) for name, key in TIMING_KEYS.items()},
        window=window,
        heldout_before=validation.get(0, float("nan")),
        heldout_after=_mean([validation[step] for step in after]),
        heldout_after_steps=tuple(after),
    )


def reward_curves(steps: list[dict]) -> dict[str, list[float]]:
    """The reward curves :func:`plot_reward` draws, by legend label: the run's, then one per environment."""
    curves = {"reward (mean score)": [s.get(REWARD, float("nan")) for s in steps]}
    for name in environment_names(steps):
        curves[f"reward: {name}"] = [environment_rewards(s).get(name, float("nan")) for s in steps]
    return curves


def plot_reward(steps: list[dict], path: str | Path, validation: dict[int, float] | None = None) -> Path:
    """Reward (and accuracy, when the environment reports it) per step, as a PNG; with several
    environments (``atropos/env/<name>/...``), one reward curve per environment as well; the
    held-out scores of ``validation`` (:func:`read_validation`) as their own markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [s["step"] for s in steps]
    for label, y in reward_curves(steps).items():
        if label == "reward (mean score)":
            ax.plot(x, y, marker="o", label=label)
        else:
            ax.plot(x, y, marker=".", linestyle="--", label=label)
    if any(ACCURACY in s for s in steps):
        ax.plot(x, [s.get(ACCURACY, float("nan")) for s in steps], marker=".", label="accuracy (environment)")
    if validation:
        ax.plot(list(validation), list(validation.values()), marker="s", color="black", label="held-out accuracy (greedy)")
    fallback = [s["step"] for s in steps if s.get(FALLBACK)]
    if fallback:
        ax.scatter(fallback, [0] * len(fallback), marker="x", color="red", label="fell back to GRPO")
    ax.set_xlabel("training step")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("GRPO with environment advantages")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
