"""reasoning-gym: procedural reasoning tasks, each judged by the task's own verifier.

reasoning-gym (``reasoning_gym``, pinned 0.1.25) generates problems locally from a task name, a
seed and a size (``reasoning_gym.create_dataset(task, seed=..., size=...)``), and each task's
dataset scores an answer against one of its entries (``dataset.score_answer(answer, entry)``: 1.0
right, partial credit for some tasks, 0.0 wrong). This module holds what the evaluate-mode
service (:class:`ReasoningGymEnvironment`), the atroposlib environment
(``atropos_reasoning_gym_env.py``) and the data script (``prepare_reasoning_gym.py``) share.

**Ground truth.** A sample's ground truth (``reward_model.ground_truth`` in the parquet, a string
on the wire) is a small JSON object naming the entry it was generated as::

    {"answer": "-204", "index": 3, "seed": 42, "size": 1200, "task": "basic_arithmetic"}

The judge rebuilds the entry with ``create_dataset(task, seed=seed, size=size)[index]`` and checks
that its answer is the one recorded. Rebuilding, not carrying the entry's metadata, because the
verifiers read metadata whose types JSON and parquet do not keep (tuples become lists), and some
tasks draw their items from the whole dataset (``size`` changes ``gsm_symbolic``'s and
``list_functions``' items), so seed, size and index name an entry exactly. The answer check stops
a parquet written by another reasoning-gym version from being judged against different problems:
such a request gets 422 naming the sample and the fix (rewrite the data with this version).

**Answer.** The last ``<answer>...</answer>`` of the response (``reasoning_gym.utils.extract_answer``,
the tag reasoning-gym's own system prompts ask for), given to the verifier as is; no tag gives it
None (most tasks score that 0.0, countdown 0.01). An answer over ``max_answer_chars`` scores 0.0
unread. A verifier that raises scores 0.0 (counted in ``scoring_errors``); one that runs past
``score_timeout_s`` is interrupted by ``SIGALRM`` and scores 0.0 (``scoring_timeouts``). The alarm needs the main thread: the service runs
evaluations there (``max_concurrent_evaluations`` = 1) and so does atroposlib's event loop; on any
other thread verifiers run without a limit.

**Advantages.** verl's GRPO outcome advantage within each group, as the GSM8K environment computes
it (:func:`recipe.atropos.environments.advantages.compute_grpo_outcome_advantages_np`).

Run: ``python recipe/atropos/environments/reasoning_gym_server.py serve --slurm false --env.tasks
basic_arithmetic,leg_counting``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import importlib.metadata
import json
import logging
import math
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import reasoning_gym
from pydantic import Field, field_validator
from reasoning_gym.factory import DATASETS
from reasoning_gym.utils import SYSTEM_PROMPTS, extract_answer

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np
from recipe.atropos.environments.base import (
    ContractError,
    EnvConfig,
    Environment,
    EvaluationRequest,
    SampleAdvantage,
    ScoredBatch,
)

logger = logging.getLogger("verl.recipe.atropos.reasoning_gym")

__all__ = [
    "SYSTEM_PROMPTS",
    "DATA_SOURCE_PREFIX",
    "EntryRef",
    "Judgement",
    "ReasoningGymConfig",
    "ReasoningGymEnvironment",
    "ReasoningGymJudge",
    "check_task_names",
    "extract_answer",
    "reasoning_gym_version",
    "rl_rows",
    "split_task_names",
]

DATA_SOURCE_PREFIX = "reasoning_gym/"  # verl's data_source of a row: reasoning_gym/<task>
# Tasks that do not generate from (seed, size) alone: composite needs its list of sub-datasets.
UNSUPPORTED_TASKS = frozenset({"composite"})


def reasoning_gym_version() -> str:
    # The package's own __version__ lags its releases (0.1.25 reports 0.1.19): ask the installer.
    return importlib.metadata.version("reasoning-gym")


def registered_tasks() -> list[str]:
    return sorted(set(DATASETS) - UNSUPPORTED_TASKS)


def check_task_names(names: Sequence[str]) -> None:
    """ValueError naming each unknown task, with the closest registered names."""
    known = registered_tasks()
    problems = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"{len(known)} tasks are registered"
            problems.append(f"{name!r} is not a reasoning-gym {reasoning_gym_version()} task ({hint})")
    if problems:
        raise ValueError("; ".join(problems) + f". Registered tasks: {', '.join(known)}")


def split_task_names(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"a,b c"`` or ``["a", "b"]`` -> ``("a", "b", "c")`` (comma or space separated, order kept, deduplicated)."""
    parts = text.replace(",", " ").split() if isinstance(text, str) else [str(p).strip() for p in text]
    return tuple(dict.fromkeys(p for p in parts if p))


# ---- ground truth: which entry a sample was generated as --------------------------------------


@dataclasses.dataclass(frozen=True)
class EntryRef:
    """An entry of ``create_dataset(task, seed=seed, size=size)``, and the answer it was written with."""

    task: str
    seed: int
    size: int
    index: int
    answer: str | None

    def to_ground_truth(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_ground_truth(cls, text: str) -> EntryRef:
        """Parse a ground truth written by :meth:`to_ground_truth`; ValueError saying what is wrong."""
        try:
            fields = json.loads(text)
        except (TypeError, ValueError):
            fields = None
        if not isinstance(fields, dict):
            raise ValueError(
                f"{_snippet(text)} is not a reasoning-gym ground truth: expected a JSON object "
                f'{{"task", "seed", "size", "index", "answer"}} as prepare_reasoning_gym.py writes it'
            )
        missing = sorted({"task", "seed", "size", "index", "answer"} - set(fields))
        if missing:
            raise ValueError(f"{_snippet(text)} lacks {missing}; rewrite the data with prepare_reasoning_gym.py")
        for name in ("seed", "size", "index"):
            if not isinstance(fields[name], int) or isinstance(fields[name], bool) or fields[name] < 0:
                raise ValueError(f"{_snippet(text)}: {name} must be a non-negative integer, got {fields[name]!r}")
        if not 0 <= fields["index"] < fields["size"]:
            raise ValueError(f"{_snippet(text)}: index {fields['index']} is outside the dataset's size {fields['size']}")
        if not isinstance(fields["task"], str) or not (fields["answer"] is None or isinstance(fields["answer"], str)):
            raise ValueError(f"{_snippet(text)}: task must be a string and answer a string or null")
        return cls(fields["task"], fields["seed"], fields["size"], fields["index"], fields["answer"])


def _snippet(text: Any, limit: int = 120) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "...'"


@functools.lru_cache(maxsize=64)
def build_dataset(task: str, seed: int, size: int) -> Any:
    """The task's dataset, once per (task, seed, size): a dataset holds its verifier's settings."""
    return reasoning_gym.create_dataset(task, seed=seed, size=size)


@functools.lru_cache(maxsize=65536)
def _entry(ref: EntryRef) -> dict[str, Any]:
    # Keyed by the whole ref (answer included): a group's samples share it, so each entry is
    # generated once; a mismatching answer is not cached as an entry (the lookup raises).
    entry = build_dataset(ref.task, ref.seed, ref.size)[ref.index]
    if entry["answer"] != ref.answer:
        raise ValueError(
            f"entry {ref.index} of {ref.task} (seed {ref.seed}, size {ref.size}) has answer {_snippet(entry['answer'])} "
            f"under reasoning-gym {reasoning_gym_version()}, but the ground truth says {_snippet(ref.answer)}: the "
            "data was written with another reasoning-gym version; rewrite it with prepare_reasoning_gym.py"
        )
    return entry


def rl_rows(
    task: str,
    seed: int,
    size: int,
    indices: range,
    split: str,
    system_prompt: str | None = "default",
) -> list[dict[str, Any]]:
    """verl RL rows (what RLHFDataset reads) of entries ``indices`` of ``create_dataset(task, seed, size)``.

    ``system_prompt``: a key of ``reasoning_gym.utils.SYSTEM_PROMPTS`` (they ask for
    ``<answer>...</answer>``), or None for the question alone.
    """
    if system_prompt is not None and system_prompt not in SYSTEM_PROMPTS:
        raise ValueError(f"system prompt {system_prompt!r} is not one of {sorted(SYSTEM_PROMPTS)} (or none)")
    dataset = build_dataset(task, seed, size)
    version = reasoning_gym_version()
    rows = []
    for index in indices:
        entry = dataset[index]
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[system_prompt]}] if system_prompt else []
        messages.append({"role": "user", "content": entry["question"]})
        ref = EntryRef(task, seed, size, index, entry["answer"])
        rows.append(
            {
                "data_source": DATA_SOURCE_PREFIX + task,
                "prompt": messages,
                "ability": dataset.category,
                "reward_model": {"style": "rule", "ground_truth": ref.to_ground_truth()},
                "extra_info": {
                    "split": split,
                    "index": index,
                    "task": task,
                    "question": entry["question"],
                    "answer": entry["answer"],
                    # JSON text: tasks' metadata differ in shape (one parquet struct cannot hold them
                    # all) and hold tuples; for reading only, the judge rebuilds the entry.
                    "metadata": json.dumps(entry["metadata"], default=str),
                    "reasoning_gym_version": version,
                },
            }
        )
    return rows


# ---- judging --------------------------------------------------------------------------------


class ScoringTimeout(BaseException):
    """Raised by the alarm in a verifier that ran too long. Not an Exception: verifiers (and sympy
    inside them) catch Exception broadly, and must not swallow the interruption."""


# How soon a lost alarm fires again: an exception raised by a signal handler while a gc callback
# runs (hypothesis, wandb and others register them) is printed and dropped, not raised in the block.
_ALARM_RETRY_S = 0.05


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`ScoringTimeout` after ``seconds`` (main thread only); the
    alarm fires again every ``_ALARM_RETRY_S`` until the block has ended, and a block that ends
    after its alarm fired (each interruption swallowed) raises it on the way out."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    running, fired = [True], [False]

    def on_alarm(signum: int, frame: Any) -> None:
        if running[0]:  # an alarm landing after the block ended must not undo its result
            fired[0] = True
            signal.setitimer(signal.ITIMER_REAL, _ALARM_RETRY_S)
            raise ScoringTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            yield
        finally:
            running[0] = False
    finally:  # apart: a retry landing before `running` is cleared still leaves the timer disarmed
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired[0]:
        raise ScoringTimeout


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One response's score; ``status``: scored, no_answer, too_long, error (verifier raised), timeout."""

    score: float
    answer: str | None
    status: str


class ReasoningGymJudge:
    """Scores responses against ground truths with the tasks' own verifiers (see the module docstring).

    ``tasks``: the tasks accepted (None: any registered task).
    """

    def __init__(
        self, tasks: Sequence[str] | None = None, max_answer_chars: int = 4096, score_timeout_s: float = 10.0
    ) -> None:
        if tasks is not None:
            check_task_names(tasks)
        self.tasks = frozenset(tasks) if tasks is not None else None
        self.max_answer_chars = max_answer_chars
        self.score_timeout_s = score_timeout_s

    def entry(self, ground_truth: str) -> tuple[EntryRef, dict[str, Any]]:
        """The entry a ground truth names; ValueError when it cannot be judged here (why, and the fix)."""
        ref = EntryRef.from_ground_truth(ground_truth)
        if self.tasks is not None and ref.task not in self.tasks:
            raise ValueError(
                f"task {ref.task!r} is not served here (--env.tasks {','.join(sorted(self.tasks))}); "
                "add it to --env.tasks or send this sample to its own service"
            )
        if ref.task not in DATASETS or ref.task in UNSUPPORTED_TASKS:
            check_task_names([ref.task])
        try:
            return ref, _entry(ref)
        except ValueError:
            raise
        except Exception as exc:  # the task's own config checks assert, generators raise their own types
            raise ValueError(
                f"reasoning-gym could not build entry {ref.index} of {ref.task} (seed {ref.seed}, size {ref.size}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def judge(self, response: str, ground_truth: str) -> tuple[str, Judgement]:
        """(task, judgement) of one response; ValueError for a ground truth :meth:`entry` refuses."""
        ref, entry = self.entry(ground_truth)
        answer = extract_answer(response)
        if answer is not None and len(answer) > self.max_answer_chars:
            return ref.task, Judgement(0.0, answer[:64], "too_long")
        dataset = build_dataset(ref.task, ref.seed, ref.size)
        try:
            with _time_limit(self.score_timeout_s):
                # None too: what a missing answer is worth is the task's call (countdown gives 0.01).
                # A copy: the entry is cached for the group's other samples, whatever the verifier does to it.
                score = float(dataset.score_answer(answer, copy.deepcopy(entry)))
        except ScoringTimeout:
            logger.warning(
                "%s: the verifier passed %.1f s on an answer of %d chars", ref.task, self.score_timeout_s, len(answer or "")
            )
            return ref.task, Judgement(0.0, answer, "timeout")
        except Exception as exc:  # verifiers raise many types on odd answers; an odd answer is wrong
            logger.debug("%s: the verifier raised %s: %s", ref.task, type(exc).__name__, exc)
            return ref.task, Judgement(0.0, answer, "error")
        if not math.isfinite(score):
            return ref.task, Judgement(0.0, answer, "error")
        return ref.task, Judgement(score, answer, "scored" if answer is not None else "no_answer")

    def score(self, response: str, ground_truth: str) -> float:
        return self.judge(response, ground_truth)[1].score


# ---- the evaluate-mode environment -----------------------------------------------------------


class ReasoningGymConfig(EnvConfig):
    """Options of the reasoning-gym environment (``--env.<name>``)."""

    tasks: tuple[str, ...] | None = Field(
        None,
        description="reasoning-gym tasks this service judges, comma-separated (e.g. basic_arithmetic,leg_counting); "
        "a sample of another task gets 422; none: every registered task",
    )
    norm_adv_by_std: bool = Field(
        True, description="divide by the group's std (GRPO); false: score - group mean (Dr. GRPO)"
    )
    epsilon: float = Field(1e-6, ge=0, description="added to the std before dividing")
    token_level: bool = Field(
        False,
        description="return each advantage as one value per response token when the request sends token ids or "
        "lengths (a float per sample otherwise)",
    )
    max_answer_chars: int = Field(4096, ge=1, description="longer <answer> contents score 0 without the verifier")
    score_timeout_s: float = Field(
        10.0, ge=0, description="seconds a task's verifier may spend on one answer (then it scores 0); 0: no limit"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return None if value is None else split_task_names(value) or None

    @field_validator("tasks")
    @classmethod
    def _registered(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            check_task_names(value)
        return value


class ReasoningGymEnvironment(Environment):
    """reasoning-gym tasks judged by their own verifiers; GRPO outcome advantages."""

    name = "reasoning_gym"
    Config = ReasoningGymConfig
    config: ReasoningGymConfig
    # One evaluation at a time, on the main thread under `serve`: the verifiers' alarm needs it,
    # and the verifiers' thread safety is not documented.
    max_concurrent_evaluations = 1

    def __init__(self, config: ReasoningGymConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.judge = ReasoningGymJudge(cfg.tasks, cfg.max_answer_chars, cfg.score_timeout_s)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["reasoning_gym_version"] = reasoning_gym_version()
        info["datasets_built"] = build_dataset.cache_info().currsize
        return info

    def required_request_fields(self) -> frozenset[str]:
        return frozenset({"ground_truths"})

    def check_request(self, request: EvaluationRequest) -> None:
        for index, ground_truth in enumerate(request.ground_truths):
            if ground_truth is None:
                raise ContractError(
                    f"ground_truths[{index}] is missing: reasoning-gym judges each response against the entry its "
                    f"ground truth names (send ground_truths with {request.batch_size} strings, as "
                    "prepare_reasoning_gym.py writes them)",
                    field="ground_truths",
                )
            try:
                self.judge.entry(ground_truth)  # cached: score() finds it again for free
            except ValueError as exc:
                raise ContractError(f"ground_truths[{index}]: {exc}", field="ground_truths") from exc

    def score(self, request: EvaluationRequest) -> ScoredBatch:
        infos = []
        for response, ground_truth in zip(request.responses, request.ground_truths):
            task, judgement = self.judge.judge(response, ground_truth or "")
            infos.append({"task": task, "answer": judgement.answer, "status": judgement.status, "score": judgement.score})
        scores_B = np.array([info["score"] for info in infos], dtype=np.float64)
        return ScoredBatch(scores_B, infos)

    def compute_advantages(self, request: EvaluationRequest, scored: ScoredBatch) -> list[SampleAdvantage]:
        cfg = self.config
        advantages_B = compute_grpo_outcome_advantages_np(
            scored.scores_B, request.group_ids, epsilon=cfg.epsilon, norm_adv_by_std=cfg.norm_adv_by_std
        )
        if cfg.token_level and request.response_lengths_B is not None:
            return [
                np.full(int(length), value, dtype=np.float32)
                for value, length in zip(advantages_B, request.response_lengths_B)
            ]
        return [float(value) for value in advantages_B]

    def metrics(self, request: EvaluationRequest, scored: ScoredBatch) -> dict[str, float]:
        """Adds ``accuracy`` (fraction scored 1.0), ``answer_found_rate``, ``scoring_errors`` and
        ``scoring_timeouts`` (samples scored 0 because the verifier raised or ran too long), and
        ``mean_reward/<task>`` for each task in the batch."""
        metrics = super().metrics(request, scored)
        infos = scored.infos
        batch_size = max(request.batch_size, 1)
        metrics["accuracy"] = sum(info["score"] >= 1.0 for info in infos) / batch_size
        metrics["answer_found_rate"] = sum(info["answer"] is not None for info in infos) / batch_size
        metrics["scoring_errors"] = float(sum(info["status"] == "error" for info in infos))
        metrics["scoring_timeouts"] = float(sum(info["status"] == "timeout" for info in infos))
        by_task: dict[str, list[float]] = {}
        for info in infos:
            by_task.setdefault(info["task"], []).append(info["score"])
        for task, scores in sorted(by_task.items()):
            metrics[f"mean_reward/{task}"] = float(np.mean(scores))
        return metrics
