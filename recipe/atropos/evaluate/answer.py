"""Reading an environment service's answer (``protocol.EvaluateResponse``) sample by sample.

What cannot be pinned on one sample (not an object, a list missing or of the wrong length)
rejects the answer. One sample's unusable advantage or score becomes an
:class:`~recipe.atropos.datatypes.InvalidSample` in its place, and a metric that is not a number
is left out, so that a bad sample costs that sample only. Token lists become float32 arrays at C
speed (msgpack already delivers arrays); only a list numpy cannot type is walked in Python.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from recipe.atropos import wire
from recipe.atropos.datatypes import EvaluationResult, InvalidSample
from recipe.atropos.errors import AtroposProtocolError
from recipe.atropos.protocol import EvaluateResponse

__all__ = ["parse_evaluation"]

logger = logging.getLogger("verl.recipe.atropos")

# The answer's fields as the wire model names them: two lists of B items and an object of numbers.
ADVANTAGES, SCORES, METRICS = EvaluateResponse.model_fields


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_list_like(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def parse_evaluation(body: Any, batch_size: int, where: str) -> EvaluationResult:
    """Check an evaluation answer against the contract: types everywhere, B items per list.

    What cannot be pinned on one sample (not an object, a list missing or of the wrong length)
    rejects the answer. One sample's unusable advantage or score becomes an
    :class:`InvalidSample` in its place, and a metric that is not a number is left out, so that a
    bad sample costs that sample only.
    """

    def broken(message: str, field: str, **details: Any) -> AtroposProtocolError:
        return AtroposProtocolError(f"{where}: the answer breaks the contract: {message}", field=field, **details)

    if not isinstance(body, Mapping):
        raise broken(f"body: expected an object, got {wire.type_name(body)}", "body")

    def per_sample_list(field: str) -> Sequence[Any]:
        if field not in body:
            raise broken(f"{field}: missing (expected {batch_size} items, one per sample)", field)
        values = body[field]
        if not _is_list_like(values) or (isinstance(values, np.ndarray) and values.ndim != 1):
            raise broken(f"{field}: expected a list of {batch_size} items, got {wire.type_name(values)}", field)
        if len(values) != batch_size:
            raise broken(
                f"{field}: has {len(values)} items, expected {batch_size} (one per sample)",
                field,
                expected=batch_size,
                actual=len(values),
            )
        return values

    advantages = [_sample_advantage(item, index) for index, item in enumerate(per_sample_list(ADVANTAGES))]
    scores, invalid_scores = _scores(per_sample_list(SCORES))
    metrics, ignored = _metrics(body.get(METRICS), broken)
    if ignored:
        logger.warning("%s: metrics %s are not finite numbers; left out", where, ignored[:10])
    return EvaluationResult(
        advantages=advantages, scores=scores, metrics=metrics, raw=dict(body), invalid_scores=invalid_scores,
        ignored_metrics=tuple(ignored),
    )


def _metrics(metrics_raw: Any, broken: Any) -> tuple[dict[str, float], list[str]]:
    """The environment's numeric metrics, and the names of those that are not finite numbers."""
    if metrics_raw is None:
        metrics_raw = {}
    if not isinstance(metrics_raw, Mapping):
        raise broken(f"metrics: expected an object of numbers, got {wire.type_name(metrics_raw)}", METRICS)
    metrics: dict[str, float] = {}
    ignored: list[str] = []
    for name, value in metrics_raw.items():
        number = _finite_or_none(value) if _is_number(value) else None
        if number is None:  # the environment's own metrics: logged when usable, never worth a step
            ignored.append(str(name))
        else:
            metrics[str(name)] = number
    return metrics, ignored


def _finite_or_none(value: Any) -> float | None:
    """float(value) when it is a finite float64, else None (ints beyond float64 overflow)."""
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


def _scores(values: Sequence[Any]) -> tuple[np.ndarray, dict[int, InvalidSample]]:
    """float64 [B] scores, NaN where a score is unusable, and why."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        scores = values.astype(np.float64)
    else:
        scores = np.array([_finite_or_none(v) if _is_number(v) else None for v in values], dtype=np.float64)
    invalid: dict[int, InvalidSample] = {}
    for index in np.flatnonzero(~np.isfinite(scores)).tolist():
        value = values[index]
        reason = "non_finite" if _is_number(value) else "malformed"
        invalid[index] = InvalidSample(reason, f"scores[{index}]: {_describe(value)} is not a finite number")
        scores[index] = np.nan
    return scores, invalid


def _describe(value: Any) -> str:
    """A value for a message: short, whatever it is."""
    return wire.type_name(value) if _is_list_like(value) or isinstance(value, Mapping) else f"{value!r:.40}"


def _sample_advantage(item: Any, index: int) -> np.ndarray | float | None | InvalidSample:
    """One sample's advantage: a float32 token array, one float, None (no override) or why it is unusable."""
    field = f"advantages[{index}]"
    if item is None:
        return None
    if _is_number(item):
        try:
            value = float(item)
        except OverflowError:  # an int beyond float64
            return InvalidSample("out_of_range", f"{field}: an integer of {len(str(abs(int(item))))} digits is beyond float64")
        if not math.isfinite(value):
            return InvalidSample("non_finite", f"{field}: {value} is not finite")
        return value
    if not _is_list_like(item):
        return InvalidSample(
            "malformed", f"{field}: expected a list of numbers, a number or null, got {wire.type_name(item)}"
        )
    if isinstance(item, np.ndarray):
        if item.ndim != 1 or (item.size and item.dtype.kind not in "iuf"):
            return InvalidSample("malformed", f"{field}: expected a flat array of numbers, got {wire.type_name(item)}")
        array = item
    else:
        # numpy's type inference checks thousands of values at C speed; only a failure walks the list.
        try:
            array = np.asarray(item)
        except (ValueError, TypeError, OverflowError):  # ragged nesting
            array = None
        if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iuf"):
            for position, value in enumerate(item):
                if not _is_number(value):
                    return InvalidSample(
                        "malformed", f"{field}[{position}]: expected a number, got {wire.type_name(value)}"
                    )
            try:  # only ints beyond int64 get here: numpy made them objects
                array = np.asarray(item, dtype=np.float64)
            except OverflowError:
                return InvalidSample("out_of_range", f"{field}: holds an integer beyond float64")
    wide = array.astype(np.float64, copy=False)
    if not np.isfinite(wide).all():
        position = int(np.flatnonzero(~np.isfinite(wide))[0])
        return InvalidSample("non_finite", f"{field}[{position}]: {wide[position]} is not finite")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        position = int(np.flatnonzero(~np.isfinite(array))[0])
        return InvalidSample("out_of_range", f"{field}[{position}]: {wide[position]:.3g} is beyond float32")
    if not array.flags.writeable:  # msgpack arrays view the received bytes; callers may write
        array = array.copy()
    return array
