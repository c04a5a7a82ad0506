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
supervision (:func:`recipe.atropos.advantages.compute_grpo_process_advantages`), with step j ending
at the token that holds its line's last visible character and the last step at the last token.
"""

from __future__ import annotations

import ast
import functools
import logging
import math
import operator
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from recipe.atropos.advantages import compute_grpo_outcome_advantages_np, compute_grpo_process_advantages
from recipe.atropos.environments.math_judge import JudgePool, Verdict, default_workers, parse_boxed, verify_parsed
from recipe.atropos.environments.base import (
    ContractError,
    EnvConfig,
    Environment,
    EvaluationRequest,
    SampleAdvantage,
    ScoredBatch,
)

logger = logging.getLogger("verl.recipe.atropos.gsm8k")

# --------------------------------------------------------------------------------------------
# Final answers
# --------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_NUMBER_AFTER_HASHES = re.compile(
    r"[-\u2212]?\s*(?:\\?\$)?\s*[-\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?"
)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# Units after a number ("18 dollars", "18\text{ dollars}") do not change it; scale words do. Each
# repetition starts with whitespace or a backslash, so the pattern cannot backtrack exponentially.
_TEXT_UNIT = r"\\(?:text|mbox|mathrm)\{[^{}]*\}"
_UNIT_SUFFIX = re.compile(rf"\s*(?:{_TEXT_UNIT}|[A-Za-z]+\.?)(?:\s+[A-Za-z]+\.?|\s*{_TEXT_UNIT})*$")
_SCALE_WORDS = re.compile(r"hundred|thousand|million|billion|trillion|percent|%", re.IGNORECASE)
_LATEX_SPACING = re.compile(r"\\[,!;: ]|\\q?quad")
# Bounds that keep answer extraction linear in the response length whatever the response holds.
_MAX_BOXES_TRIED = 16
_MAX_BOXED_CHARS = 1024
_MAX_NUMBER_CHARS = 1024
_HASH_ANSWER_WINDOW = 256


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced; also ``\\boxed 5``), or None.

    A box left open (a truncated response) or longer than 1024 characters does not count; the one
    before it is tried, up to the last 16 boxes.
    """
    for match in list(_BOXED.finditer(text))[::-1][:_MAX_BOXES_TRIED]:
        window = text[match.end() : match.end() + _MAX_BOXED_CHARS]
        if match.group(1) is None:  # "\boxed 42": the next token
            token = re.match(r"\s*([^\s$]+)", window)
            if token:
                return token.group(1)
            continue
        depth = 1
        for position, char in enumerate(window):
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return window[:position].strip() or None
    return None


def extract_hash_answer(text: str) -> str | None:
    """The number after the last ``####`` (signs, ``$``, commas and ``a/b`` kept), or None."""
    position = text.rfind("####")
    if position < 0:
        return None
    match = _NUMBER_AFTER_HASHES.search(text[position + 4 : position + 4 + _HASH_ANSWER_WINDOW])
    return match.group(0).strip() if match else None


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the last ``\\boxed{}``, else the number after the last ``####``."""
    return extract_boxed(response) or extract_hash_answer(response)


def reference_answer(ground_truth: str) -> str:
    """The answer part of a reference: what follows the last ``####`` of a GSM8K solution, else all of it."""
    position = ground_truth.rfind("####")
    return (ground_truth[position + 4 :] if position >= 0 else ground_truth).strip()


def plain_number(text: str) -> Decimal | None:
    """The value of a plain number as people write it, or None when it is anything else.

    ``1,000`` / ``$1000`` / ``\\$1{,}000`` / ``1000.0`` / ``1000.`` / ``18 dollars`` / ``-5`` all
    qualify; fractions, percentages, expressions and scale words do not (math-verify judges those).
    """
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    s = _LATEX_SPACING.sub("", text).replace("{,}", ",").replace("\u2212", "-")
    s = s.replace("\\$", "").replace("$", "").strip()
    if _SCALE_WORDS.search(s):
        return None
    s = _UNIT_SUFFIX.sub("", s).strip().rstrip(".")
    s = re.sub(r"^([+-])\s+", r"\1", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


# math-verify's timeouts use signal.alarm, which only works in the main thread; elsewhere a
# timeout makes it fail every comparison, so it runs without one and what could hang is refused.
_RISKY_FOR_UNTIMED = re.compile(r"\^|\*\*|!|\\binom|\\choose|\\uparrow|\\prod|\\sum|\\int")


class AnswerMatcher:
    """Decides whether an answer equals a reference: exact numbers first, math-verify otherwise.

    Caches the parsed references and the math-verify verdicts (LRU), since a batch holds many
    responses to the same problem and policies repeat their answers. Thread-safe. :meth:`matches`
    runs math-verify in this process; :meth:`quick_verdict` and :meth:`remember` let a caller run
    it elsewhere (the GSM8K service uses a :class:`~recipe.atropos.environments.math_judge.JudgePool`).
    """

    def __init__(self, timeout_s: int = 2, max_answer_chars: int = 256, cache_size: int = 65536) -> None:
        self.timeout_s = int(timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._references: OrderedDict[str, tuple[Decimal | None, Any]] = OrderedDict()
        self._verdicts: OrderedDict[tuple[str, str], bool] = OrderedDict()

    def _timeout(self) -> int | None:
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None

    def _reference(self, reference: str) -> tuple[Decimal | None, Any]:
        with self._lock:
            cached = self._references.get(reference)
            if cached is not None:
                self._references.move_to_end(reference)
                return cached
        cached = (plain_number(reference), None)
        self._remember(self._references, reference, cached)
        return cached

    def _parsed_reference(self, reference: str) -> Any:
        number, parsed = self._reference(reference)
        if parsed is None:
            parsed = parse_boxed(reference, self._timeout())
            self._remember(self._references, reference, (number, parsed))
        return parsed

    def _remember(self, cache: OrderedDict, key: Any, value: Any) -> None:
        with self._lock:
            cache[key] = value
            if len(cache) > self._cache_size:
                cache.popitem(last=False)

    def quick_verdict(self, answer: str, reference: str) -> bool | None:
        """The verdict when math-verify is not needed (too long, plain numbers, or cached); else None."""
        if len(answer) > self.max_answer_chars or len(reference) > self.max_answer_chars:
            return False
        reference_number, _ = self._reference(reference)
        answer_number = plain_number(answer)
        if reference_number is not None and answer_number is not None:
            return answer_number == reference_number
        with self._lock:
            return self._verdicts.get((answer, reference))

    def remember(self, answer: str, reference: str, verdict: bool) -> None:
        """Caches a math-verify verdict reached elsewhere."""
        self._remember(self._verdicts, (answer, reference), verdict)

    def matches(self, answer: str, reference: str) -> bool:
        """True when ``answer`` equals ``reference`` (both longer than ``max_answer_chars``: False)."""
        verdict = self.quick_verdict(answer, reference)
        if verdict is None:
            timeout = self._timeout()
            if timeout is None and _RISKY_FOR_UNTIMED.search(answer):
                return False  # not cached: the main thread may judge it later, with a timeout
            verdict = verify_parsed(self._parsed_reference(reference), answer, timeout)
            self.remember(answer, reference, verdict)
        return verdict


# --------------------------------------------------------------------------------------------
# Arithmetic of a step (process supervision)
# --------------------------------------------------------------------------------------------

_ANNOTATION = re.compile(r"<<([^<>]*?)=([^<>]*)>>")
_ARITH_CHARS = frozenset("0123456789.,+-*/()$^ \t\u2212\u00d7\u00f7\u00b7xX")
_EXPRESSION_START = re.compile(r"[\d(\-\u2212$]|\.\d")
_RHS_NUMBER = re.compile(r"\s*([-\u2212]?)\s*\$?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)")
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")
_MAX_EXPRESSION_CHARS = 200
_BIN_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


class _NotArithmetic(Exception):
    """Text that is not a plain arithmetic expression (it is ignored, not judged)."""


def _is_thousands_comma(text: str, position: int) -> bool:
    digits = text[position + 1 : position + 4]
    after = text[position + 4 : position + 5]
    return position > 0 and text[position - 1].isdigit() and len(digits) == 3 and digits.isdigit() and not after.isdigit()


def _parse_expression(text: str) -> ast.expr:
    """``$1,200 x 3 - 4^2`` -> a Python AST of numbers and + - * / ** (raises _NotArithmetic)."""
    s = text.strip().rstrip(".").strip()
    if not s or len(s) > _MAX_EXPRESSION_CHARS:
        raise _NotArithmetic(text)
    s = "".join("" if c == "," and _is_thousands_comma(s, i) else c for i, c in enumerate(s))
    if "," in s:
        raise _NotArithmetic(text)
    s = s.replace("$", "").replace("\u2212", "-").replace("\u00f7", "/").replace("^", "**")
    for times in ("\u00d7", "\u00b7", "x", "X"):
        s = s.replace(times, "*")
    s = _LEADING_ZEROS.sub("", s)
    try:
        tree = ast.parse(s, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _NotArithmetic(text) from exc
    return tree


def _evaluate(node: ast.expr) -> float:
    """Value of an arithmetic AST in floats (ArithmeticError for 1/0, overflow, complex results)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        value = _BIN_OPS[type(node.op)](left, right)
        if isinstance(value, complex) or not math.isfinite(value):
            raise ArithmeticError("no finite real value")
        return value
    raise _NotArithmetic(ast.dump(node))


def _has_operation(node: ast.expr) -> bool:
    return any(isinstance(child, ast.BinOp) for child in ast.walk(node))


def _decimals(number_text: str) -> int:
    """Digits after the point as written: ``33.33`` -> 2 (a rounded result is right to that precision)."""
    return len(number_text.split(".", 1)[1]) if "." in number_text else 0


def _close(value: float, claimed: float, claimed_decimals: int) -> bool:
    if abs(value - claimed) <= 1e-9 * max(1.0, abs(value), abs(claimed)):
        return True
    return claimed_decimals > 0 and abs(value - claimed) <= 0.5 * 10.0**-claimed_decimals + 1e-12


def _check_equation(lhs_text: str, rhs_text: str) -> bool | None:
    """True/False for ``lhs = rhs`` when lhs is arithmetic with an operation; None when it is not.

    The right side is read both as its leading number (``3 + 4 = 7 apples``, running totals as in
    ``3 + 4 = 7 * 2 = 14``) and as a whole expression (chains as in ``2 + 3 + 1 = 5 + 1 = 6``);
    the step is right when either reading matches.
    """
    start = _EXPRESSION_START.search(lhs_text)
    if start is None:
        return None
    try:
        lhs_tree = _parse_expression(lhs_text[start.start() :])
    except _NotArithmetic:
        return None
    if not _has_operation(lhs_tree):
        return None
    number = _RHS_NUMBER.match(rhs_text)
    if number is None:
        return None
    try:
        lhs_value = _evaluate(lhs_tree)
    except _NotArithmetic:
        return None
    except ArithmeticError:
        return False
    number_text = number.group(2).replace(",", "")
    claimed = float(number_text) * (-1.0 if number.group(1) else 1.0)
    if _close(lhs_value, claimed, _decimals(number_text)):
        return True
    try:
        rhs_value = _evaluate(_parse_expression(rhs_text))
        return _close(lhs_value, rhs_value, 0)
    except (_NotArithmetic, ArithmeticError):
        return False


def _arith_suffix(text: str, end: int) -> str:
    start = end
    while start > 0 and (text[start - 1] in _ARITH_CHARS):
        if text[start - 1] == "," and not _is_thousands_comma(text, start - 1):
            break
        start -= 1
    return text[start:end]


def _arith_prefix(text: str, start: int) -> str:
    end = start
    while end < len(text) and text[end] in _ARITH_CHARS:
        if text[end] == "," and not _is_thousands_comma(text, end):
            break
        end += 1
    return text[start:end]


def step_reward(line: str) -> int:
    """+1 when the line has arithmetic and all of it is right, -1 when any is wrong, 0 without any.

    Arithmetic is GSM8K's ``<<expr=value>>`` annotations and ``a op b = c`` equations (numbers
    with ``+ - * x / ^``, parentheses, ``$`` and thousands commas).
    """
    verdicts: list[bool] = []
    for match in _ANNOTATION.finditer(line):
        verdict = _check_equation(match.group(1), match.group(2))
        if verdict is not None:
            verdicts.append(verdict)
    rest = _ANNOTATION.sub(" ", line)
    for position, char in enumerate(rest):
        if char != "=" or rest[position - 1 : position] in ("<", ">", "!", "=") or rest[position + 1 : position + 2] in ("=", ">"):
            continue
        verdict = _check_equation(_arith_suffix(rest, position), _arith_prefix(rest, position + 1))
        if verdict is not None:
            verdicts.append(verdict)
    if not verdicts:
        return 0
    return 1 if all(verdicts) else -1


def split_steps(text: str) -> list[tuple[str, int]]:
    """The non-blank lines of a text, each with the index of its last visible character."""
    steps, offset = [], 0
    for line in text.split("\n"):
        stripped = line.rstrip()
        if stripped.strip():
            steps.append((line, offset + len(stripped) - 1))
        offset += len(line) + 1
    return steps


def decode_with_char_ends(backend_tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """Decode token ids incrementally: the text and, per token, the end (exclusive) of its characters.

    Uses ``tokenizers``' streaming decoder, so a character split over several byte tokens belongs
    to the token that completes it; special tokens add no text. Returns (text, int64 [T]).
    """
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    chunks: list[str] = []
    ends_T = np.empty(len(token_ids), dtype=np.int64)
    length = 0
    for index, token_id in enumerate(token_ids):
        chunk = stream.step(backend_tokenizer, int(token_id))
        if chunk:
            chunks.append(chunk)
            length += len(chunk)
        ends_T[index] = length
    return "".join(chunks), ends_T


def step_end_tokens(step_end_chars: Sequence[int], char_ends_T: np.ndarray) -> np.ndarray:
    """Index of the token that holds each step's last character; the last step ends at the last token."""
    num_tokens = len(char_ends_T)
    if not step_end_chars or num_tokens == 0:
        return np.zeros(0, dtype=np.int64)
    ends_S = np.searchsorted(char_ends_T, np.asarray(step_end_chars, dtype=np.int64), side="right")
    ends_S = np.minimum(ends_S, num_tokens - 1)
    ends_S[-1] = num_tokens - 1
    return ends_S


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


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
