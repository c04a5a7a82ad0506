"""GSM8K: grade-school math judged by its final answer (outcome) or line by line (process).

Outcome supervision (default): the final answer is the last ``\\boxed{...}`` of the response, or
else the number after its last ``####``; it is compared with the reference (a plain answer, or a
GSM8K solution ending in ``#### N``). Plain numbers are compared exactly after removing thousands
separators, currency signs and trailing zeros (``1,000`` = ``$1000`` = ``1000.0``); anything else
goes to math-verify. Score 1.0 when correct, 0.0 when wrong or missing. The advantage of sample i
is verl's GRPO outcome advantage, A_i = (s_i - mean_g) / (std_g + eps) (unbiased std; a singleton
group keeps its raw score), or s_i - mean_g without std normalization.

Process supervision (``--env.supervision process``): the steps are the non-blank lines of the text
the response tokens decode to. A line whose arithmetic (``a op b = c``, or GSM8K's
``<<expr=value>>`` annotations) is all right scores +1, one with any wrong -1, others 0; the final
answer's outcome score is added to the last step. Token advantages follow GRPO process
supervision (:func:`recipe.atropos.environments.advantages.compute_grpo_process_advantages`), with step j ending
at the token that holds its line's last visible character and the last step at the last token.

Answers are read and matched in ``gsm8k_answers``, steps judged in ``gsm8k_steps``; this module
holds the options and the environment.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from recipe.atropos.environments.advantages import compute_grpo_outcome_advantages_np, compute_grpo_process_advantages
from recipe.atropos.environments.gsm8k_answers import AnswerMatcher, extract_answer, reference_answer
from recipe.atropos.environments.gsm8k_steps import decode_with_char_ends, split_steps, step_end_tokens, step_reward
from recipe.atropos.environments.math_judge import JudgePool, Verdict, default_workers
from recipe.atropos.environments.base import (
    ContractError,
    EnvConfig,
    Environment,
    EvaluationRequest,
    SampleAdvantage,
    ScoredBatch,
)

logger = logging.getLogger("verl.recipe.atropos.gsm8k")


class GSM8KConfig(EnvConfig):
    """Options of the GSM8K environment (``--env.<name>``)."""

    supervision: Literal["outcome", "process"] = Field(
        "outcome",
        description="outcome: one score per response from its final answer; process: +1/-1/0 per line by its "
        "arithmetic plus the outcome on the last line, token-level GRPO process advantages (needs token ids "
        "in requests and --env.tokenizer_name)",
    )
    norm_adv_by_std: bool = Field(
        True, description="divide by the group's std (GRPO); false: score - group mean (Dr. GRPO)"
    )
    epsilon: float = Field(1e-6, ge=0, description="added to the std before dividing")
    token_level: bool = Field(
        False,
        description="outcome mode: return each advantage as one value per response token when the request "
        "sends token ids or lengths (a float per sample otherwise)",
    )
    tokenizer_name: str | None = Field(
        None, description="tokenizer (local dir or HF name) whose ids requests send; required for process mode"
    )
    math_verify_timeout_s: int = Field(
        2,
        ge=1,
        description="seconds allowed to judge one answer that is not a plain number (math-verify, in a worker "
        "process killed at the deadline); such an answer scores 0",
    )
    math_verify_budget_s: float = Field(
        10.0,
        gt=0,
        description="seconds of math-verify judging allowed per request; answers not judged by then score 0 "
        "(counted in the answer's metrics and in /health)",
    )
    math_verify_workers: int = Field(
        0, ge=0, description="math-verify worker processes; 0: one per CPU core plus one (at most 8)"
    )
    max_answer_chars: int = Field(256, ge=1, description="longer final answers are judged wrong without parsing")

    @model_validator(mode="after")
    def _process_needs_tokenizer(self) -> GSM8KConfig:
        if self.supervision == "process" and not self.tokenizer_name:
            raise ValueError("--env.supervision process needs --env.tokenizer_name (the trainer's tokenizer)")
        return self


class GSM8KEnvironment(Environment):
    """GSM8K with outcome (default) or process supervision; see the module docstring for the formulas."""

    name = "gsm8k"
    Config = GSM8KConfig
    config: GSM8KConfig
    # Thread-safe (locked caches, tokenizers' Rust decoder); math-verify runs in the judge pool.
    max_concurrent_evaluations = 4

    def __init__(self, config: GSM8KConfig | None = None) -> None:
        super().__init__(config)
        self.matcher = AnswerMatcher(self.config.math_verify_timeout_s, self.config.max_answer_chars)
        self.tokenizer: Any = None
        self._vocab_size = 0
        self.judges: JudgePool | None = None  # set by setup(); without it math-verify runs in process

    def setup(self) -> None:
        if self.config.tokenizer_name:
            self.tokenizer = load_tokenizer(self.config.tokenizer_name)
            backend = self.tokenizer.backend_tokenizer
            self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # One worker more than the cores: a request may keep all but one busy, so another request
        # always finds a free worker instead of waiting for a slow answer's deadline.
        workers = self.config.math_verify_workers or min(default_workers() + 1, 8)
        self.judges = JudgePool(workers, self.config.math_verify_timeout_s)
        self.judges.warm_up()  # the workers import sympy's parsers (about a second): before serving

    def close(self) -> None:
        judges, self.judges = self.judges, None
        if judges is not None:
            judges.close()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.tokenizer is not None:
            info["tokenizer_vocab_size"] = self._vocab_size
        if self.judges is not None:
            info["math_verify"] = self.judges.describe()
        return info

    def required_request_fields(self) -> frozenset[str]:
        return frozenset({"ground_truths", "response_token_ids"} if self.config.supervision == "process" else {"ground_truths"})

    def check_request(self, request: EvaluationRequest) -> None:
        for index, ground_truth in enumerate(request.ground_truths):
            if ground_truth is None:
                raise ContractError(
                    f"ground_truths[{index}] is missing: gsm8k judges every response against its reference answer "
                    f"(send ground_truths with {request.batch_size} strings)",
                    field="ground_truths",
                )
        if self.config.supervision != "process":
            return
        if request.response_token_ids is None:
            raise ContractError(
                "process supervision needs response_token_ids: token advantages are placed on the response's "
                "lines by decoding the exact tokens the trainer trains on (response_lengths are not enough)",
                field="response_token_ids",
            )
        for index, ids in enumerate(request.response_token_ids):
            if ids.size and int(ids.max()) >= self._vocab_size:
                raise ContractError(
                    f"response_token_ids[{index}] has id {int(ids.max())}, outside the vocabulary of "
                    f"{self._vocab_size} tokens of tokenizer {self.config.tokenizer_name!r}",
                    field="response_token_ids",
                )

    def score(self, request: EvaluationRequest) -> ScoredBatch:
        verdicts = self._judge([extract_answer(r) for r in request.responses], request.ground_truths)
        scores_B = np.array([1.0 if verdict.correct else 0.0 for _, verdict in verdicts], dtype=np.float64)
        infos = [{"answer": answer, "correct": verdict.correct, "verdict": verdict} for answer, verdict in verdicts]
        if self.config.supervision == "process":
            for info, ids, score in zip(infos, request.response_token_ids or [], scores_B):
                info.update(self._process_steps(ids, float(score)))
        return ScoredBatch(scores_B, infos)

    def _judge(self, answers: list[str | None], ground_truths: list[str | None]) -> list[tuple[str | None, Verdict]]:
        """(answer, verdict) per sample: exact numbers and cached verdicts here, the rest by
        math-verify in the judge pool within the request's budget (each distinct pair once)."""
        verdicts: list[Verdict | None] = []
        waiting: dict[tuple[str, str], list[int]] = {}
        for index, (answer, ground_truth) in enumerate(zip(answers, ground_truths)):
            reference = reference_answer(ground_truth or "")
            quick = False if answer is None else self.matcher.quick_verdict(answer, reference)
            verdicts.append(None if quick is None else (Verdict.CORRECT if quick else Verdict.WRONG))
            if quick is None:
                waiting.setdefault((answer, reference), []).append(index)
        pairs = list(waiting)
        if self.judges is None:  # not set up (in-process use): judge here, as atroposlib's env does
            judged = [Verdict.CORRECT if self.matcher.matches(*pair) else Verdict.WRONG for pair in pairs]
        else:
            judged = self.judges.judge_all(pairs, self.config.math_verify_budget_s)
        for pair, verdict in zip(pairs, judged):
            if verdict is not Verdict.OVER_BUDGET:  # a timed-out answer stays wrong: never pay for it twice
                self.matcher.remember(*pair, verdict.correct)
            for index in waiting[pair]:
                verdicts[index] = verdict
        return list(zip(answers, verdicts))

    def _process_steps(self, token_ids: np.ndarray, outcome: float) -> dict[str, Any]:
        """Step rewards and step end token indices of one response (see the module docstring)."""
        text, char_ends_T = decode_with_char_ends(self.tokenizer.backend_tokenizer, token_ids)
        steps = split_steps(text)
        arithmetic_S = [float(step_reward(line)) for line, _ in steps]
        end_chars_S = [end for _, end in steps]
        if not steps:  # nothing visible: one step, over all tokens, carrying the outcome
            arithmetic_S, end_chars_S = [0.0], [0]
        ends_S = step_end_tokens(end_chars_S, char_ends_T)
        if not ends_S.size:  # no response tokens: nothing to place a step on
            arithmetic_S = []
        rewards_S = list(arithmetic_S)
        if rewards_S:
            rewards_S[-1] += outcome
        return {"arithmetic_rewards": arithmetic_S, "step_rewards": rewards_S, "step_ends": ends_S}

    def compute_advantages(self, request: EvaluationRequest, scored: ScoredBatch) -> list[SampleAdvantage]:
        cfg = self.config
        if cfg.supervision == "process":
            return self._process_advantages(request, scored)
        advantages_B = compute_grpo_outcome_advantages_np(
            scored.scores_B, request.group_ids, epsilon=cfg.epsilon, norm_adv_by_std=cfg.norm_adv_by_std
        )
        if cfg.token_level and request.response_lengths_B is not None:
            return [
                np.full(int(length), value, dtype=np.float32)
                for value, length in zip(advantages_B, request.response_lengths_B)
            ]
        return [float(value) for value in advantages_B]

    def _process_advantages(self, request: EvaluationRequest, scored: ScoredBatch) -> list[SampleAdvantage]:
        cfg = self.config
        assert request.response_lengths_B is not None  # check_request demands token ids
        group_B = request.group_index_B()
        advantages: list[SampleAdvantage] = [None] * request.batch_size
        for group in range(int(group_B.max()) + 1 if group_B.size else 0):
            members = np.flatnonzero(group_B == group)
            group_advantages = compute_grpo_process_advantages(
                [scored.infos[i]["step_rewards"] for i in members],
                [scored.infos[i]["step_ends"] for i in members],
                [int(request.response_lengths_B[i]) for i in members],
                epsilon=cfg.epsilon,
                norm_adv_by_std=cfg.norm_adv_by_std,
            )
            for member, values in zip(members, group_advantages):
                advantages[member] = values
        return advantages

    def metrics(self, request: EvaluationRequest, scored: ScoredBatch) -> dict[str, float]:
        """Adds ``accuracy`` (fraction correct), ``answer_found_rate``, ``math_verify_timeouts`` and
        ``math_verify_over_budget`` (samples scored 0 because judging their answer passed
        ``math_verify_timeout_s``, or the request's ``math_verify_budget_s`` ran out first); in
        process mode ``steps_per_response`` and ``wrong_step_rate`` (fraction of steps whose
        arithmetic is wrong)."""
        metrics = super().metrics(request, scored)
        batch_size = max(request.batch_size, 1)
        metrics["accuracy"] = sum(info["correct"] for info in scored.infos) / batch_size
        metrics["answer_found_rate"] = sum(info["answer"] is not None for info in scored.infos) / batch_size
        metrics["math_verify_timeouts"] = float(sum(info["verdict"] is Verdict.TIMED_OUT for info in scored.infos))
        metrics["math_verify_over_budget"] = float(sum(info["verdict"] is Verdict.OVER_BUDGET for info in scored.infos))
        if self.config.supervision == "process":
            num_steps = sum(len(info["step_rewards"]) for info in scored.infos)
            wrong = sum(reward < 0 for info in scored.infos for reward in info["arithmetic_rewards"])
            metrics["steps_per_response"] = num_steps / batch_size
            metrics["wrong_step_rate"] = wrong / num_steps if num_steps else 0.0
        return metrics


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """A fast (``tokenizers``-backed) tokenizer from a local dir or an HF name (no download when offline)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"tokenizer {name!r} is not a fast (tokenizers-backed) tokenizer; process supervision needs one")
    return tokenizer
