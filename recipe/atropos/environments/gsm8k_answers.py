"""GSM8K final answers: where a response states its answer, and whether it equals the reference.

The final answer is the last ``\\boxed{...}`` of the response, or else the number after its last
``####``; a reference is a plain answer or a GSM8K solution ending in ``#### N``. Plain numbers
are compared exactly after removing thousands separators, currency signs and trailing zeros
(``1,000`` = ``$1000`` = ``1000.0``); anything else goes to math-verify.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from decimal import Decimal, InvalidOperation
from typing import Any

from recipe.atropos.environments.math_judge import parse_boxed, verify_parsed

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
