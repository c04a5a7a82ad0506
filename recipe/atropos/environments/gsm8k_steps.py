"""Arithmetic of a step (GSM8K process supervision), and the token where each step ends.

A step is a non-blank line of the text the response tokens decode to. A line whose arithmetic
(``a op b = c``, or GSM8K's ``<<expr=value>>`` annotations) is all right scores +1, one with any
wrong -1, others 0. Expressions are parsed as Python ASTs of numbers and + - * / ** only, and
evaluated in floats: nothing else in a line is ever executed.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
