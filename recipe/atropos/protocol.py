"""The evaluate protocol's wire models (docs/PROTOCOL.md): one definition of each body, used by both sides.

The service's routes validate requests with these models and publish them as its OpenAPI schema;
the client checks a request with the same validation before sending it and reads an answer by the
field names defined here; tests import them. The rules a JSON schema cannot carry (every per-sample
list has B items, ``response_lengths`` equal the token ids' lengths, a total token budget) are
checked by :func:`check_evaluate_request`, which both sides run.

Speed: token ids are never validated item by item in Python. They become int32 numpy arrays whose
dtype, shape and range are checked at C speed (:func:`recipe.atropos.wire.token_id_array`); the
models validate the small fields (strings, group ids, lengths) in strict mode.

Trajectory mode's wire is atroposlib's ``ScoredData``; the values of it that this recipe's
environments write and its trainer reads (:data:`IGNORE_INDEX`, :data:`POLICY_STEP_KEY`) are
defined here too, so an environment process reads them without importing the torch side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, create_model

from recipe.atropos import wire
from recipe.atropos.datatypes import EvaluationRequest, SampleAdvantage
from recipe.atropos.errors import ContractError

__all__ = [
    "EVALUATE_PATH",
    "HEALTH_PATH",
    "IGNORE_INDEX",
    "POLICY_STEP_KEY",
    "PER_SAMPLE_FIELDS",
    "REGISTER_PATH",
    "ErrorDetail",
    "ErrorResponse",
    "EvaluateRequest",
    "EvaluateResponse",
    "RegisterInferenceEndpointRequest",
    "check_evaluate_request",
    "evaluate_request_model",
    "evaluate_response",
    "parse_evaluation_request",
    "validation_message",
]

HEALTH_PATH = "/health"
EVALUATE_PATH = "/evaluate_and_compute_advantages"
REGISTER_PATH = "/register_inference_endpoint"

# Trajectory mode (atroposlib's ScoredData): a ``masks`` value of -100 marks a token not trained on
# (the prompt, environment text); ``generation_params[POLICY_STEP_KEY]`` is the trajectory API's
# step when the group was sampled (informational: the trainer measures staleness from the policy
# gateway's records, trajectory/staleness.py, since run-api's step counts batches handed out).
IGNORE_INDEX = -100
POLICY_STEP_KEY = "policy_step"

# Integers travel as 64-bit on the wire (orjson, msgpack); token ids and lengths as int32. The
# bounds are exact as floats too (FastAPI's OpenAPI writes them as floats: 2**63 - 1 would round up).
GroupIdInt = Annotated[int, Field(ge=-(2**63), lt=2**63)]
TokenId = Annotated[int, Field(ge=0, le=wire.MAX_TOKEN_ID)]
_PER_SAMPLE = "one per prompt (JSON Schema cannot say: a list of another length gets 422 naming the field)"


class EvaluateRequest(BaseModel):
    """``POST /evaluate_and_compute_advantages`` body (B = number of samples).

    The rules a schema cannot carry: every per-sample list has B items; ``response_lengths``, when
    sent with ``response_token_ids``, equals their lengths; the lengths sum to at most the
    service's ``max_total_tokens`` (``/health`` ``limits``). Breaking one gets 422 naming the field.
    """

    # Strict: a number where text is expected is an error, not a conversion. Unknown keys are ignored.
    model_config = ConfigDict(strict=True)

    prompts: list[str] = Field(min_length=1, description="the prompt text of each sample (B items, B >= 1)")
    responses: list[str] = Field(description=f"the generated response text of each sample, {_PER_SAMPLE}")
    metadata: dict[str, Any] | None = Field(None, description="free-form, request level")
    group_ids: list[StrictStr | GroupIdInt] | None = Field(
        None, description=f"samples with equal values form one GRPO group, {_PER_SAMPLE}; default: identical prompt text"
    )
    ground_truths: list[str | None] | None = Field(None, description=f"reference answers, {_PER_SAMPLE}")
    response_token_ids: list[list[TokenId]] | None = Field(
        None,
        description=f"the exact response tokens the trainer trains on (msgpack: int arrays), {_PER_SAMPLE}",
    )
    response_lengths: list[TokenId] | None = Field(
        None, description=f"number of response tokens, when ids are not sent, {_PER_SAMPLE}"
    )


# Every list but the prompts has one item per prompt.
PER_SAMPLE_FIELDS = tuple(name for name in EvaluateRequest.model_fields if name not in ("prompts", "metadata"))
# Validated by the model; the token ids are checked by numpy (see the module docstring).
_SMALL_FIELDS = tuple(name for name in EvaluateRequest.model_fields if name != "response_token_ids")

# What a field becomes when the environment needs it (Environment.required_request_fields).
_REQUIRED_FORMS: dict[str, Any] = {
    "ground_truths": (list[str], Field(description=f"reference answers (this environment needs them), {_PER_SAMPLE}")),
    "response_token_ids": (
        list[list[TokenId]],
        Field(description=f"the exact response tokens (this environment needs them), {_PER_SAMPLE}"),
    ),
}


def evaluate_request_model(required: frozenset[str] = frozenset()) -> type[EvaluateRequest]:
    """The request schema of a service whose environment needs ``required`` (non-null, every sample)."""
    unknown = set(required) - set(_REQUIRED_FORMS)
    if unknown:
        raise ValueError(f"required_request_fields: {sorted(unknown)} cannot be required; supported: {sorted(_REQUIRED_FORMS)}")
    if not required:
        return EvaluateRequest
    return create_model(
        "EvaluateRequest", __base__=EvaluateRequest, __doc__=EvaluateRequest.__doc__,
        **{name: _REQUIRED_FORMS[name] for name in sorted(required)},
    )


# Environments build it with evaluate_response (unvalidated: token advantages stay float32 arrays,
# which the wire encodes raw); the client reads it leniently, sample by sample
# (recipe.atropos.evaluate.answer), so that one bad sample costs that sample only.
class EvaluateResponse(BaseModel):
    """200 answer of ``POST /evaluate_and_compute_advantages``."""

    advantages: list[list[float] | float | None] = Field(
        description="per sample: one value per response token, one float (broadcast), or null (no override)"
    )
    scores: list[float] = Field(description="the reward of each sample")
    metrics: dict[str, float] = Field(description="environment metrics, e.g. mean_reward, accuracy")


class RegisterInferenceEndpointRequest(BaseModel):
    """``POST /register_inference_endpoint`` body."""

    model_config = ConfigDict(strict=True)

    base_url: str = Field(
        pattern=r"^https?://", description="OpenAI-compatible base URL (http or https), e.g. http://host:port/v1"
    )
    model: str = Field(min_length=1, description="served model name")
    api_key: str | None = Field(None, description="key for that server, if it needs one")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: ErrorDetail


# --------------------------------------------------------------------------------------------
# Requests: the checks both sides run
# --------------------------------------------------------------------------------------------


def validation_message(exc: ValidationError) -> tuple[str, str]:
    """(field, message) of a pydantic error: ``responses[3]: Input should be a valid string (got int 7)``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    location = [str(part) for part in first["loc"]]
    field = location[0] if location else "body"
    where = field + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in location[1:])
    value = first.get("input")
    got = type(value).__name__ + (f" {value!r:.40}" if isinstance(value, (int, float)) else "")
    message = f"{where}: {first['msg']} (got {got})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s)"
    return field, message


def _plain(value: Any) -> Any:
    """A list as the strict model takes it: msgpack int arrays and tuples made lists."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _without_numpy_scalars(small: dict[str, Any]) -> dict[str, Any] | None:
    """The fields with numpy scalars (a caller's np.int64 group ids) made Python's; None if there were none."""
    changed = False
    plain = dict(small)
    for key, value in small.items():
        if isinstance(value, list) and any(isinstance(item, np.generic) for item in value):
            plain[key] = [item.item() if isinstance(item, np.generic) else item for item in value]
            changed = True
    return plain if changed else None


def _validate_small_fields(small: dict[str, Any]) -> EvaluateRequest:
    try:
        return EvaluateRequest.model_validate(small)
    except ValidationError as exc:
        plain = _without_numpy_scalars(small)  # only looked for when strict validation failed
        if plain is not None:
            return _validate_small_fields(plain)
        field, message = validation_message(exc)
        raise ContractError(message, field) from exc


def _token_arrays(token_ids: Any, batch_size: int) -> list[np.ndarray]:
    """B samples' token ids as int32 arrays [T_i], type and range checked without a Python loop per token."""
    if isinstance(token_ids, tuple) or (isinstance(token_ids, np.ndarray) and token_ids.ndim == 2):
        token_ids = list(token_ids)  # a caller's tuple or matrix; msgpack and JSON give lists
    if not isinstance(token_ids, list):
        raise ContractError(
            f"response_token_ids: expected a list of {batch_size} lists of int, got {type(token_ids).__name__}",
            "response_token_ids",
        )
    if len(token_ids) != batch_size:
        raise ContractError(
            f"response_token_ids has {len(token_ids)} items but prompts has {batch_size} (one per sample)",
            "response_token_ids",
        )
    arrays = []
    for index, item in enumerate(token_ids):
        try:
            arrays.append(wire.token_id_array(item))
        except ValueError as exc:
            raise ContractError(f"response_token_ids[{index}]: {exc}", "response_token_ids") from exc
    return arrays


def _check_lengths(fields: EvaluateRequest, ids_B: list[np.ndarray] | None, max_total_tokens: int | None) -> None:
    """``response_lengths`` equal to the token ids' lengths; the total within ``max_total_tokens``."""
    lengths_B: np.ndarray | None = None
    if ids_B is not None:
        lengths_B = np.fromiter((ids.size for ids in ids_B), dtype=np.int64, count=len(ids_B))
        if fields.response_lengths is not None:
            sent_B = np.asarray(fields.response_lengths, dtype=np.int64)
            mismatch = np.flatnonzero(sent_B != lengths_B)
            if mismatch.size:
                index = int(mismatch[0])
                raise ContractError(
                    f"response_lengths[{index}] is {int(sent_B[index])} but response_token_ids[{index}] has "
                    f"{int(lengths_B[index])} tokens",
                    "response_lengths",
                )
    elif fields.response_lengths is not None:
        lengths_B = np.asarray(fields.response_lengths, dtype=np.int64)
    if max_total_tokens is not None and lengths_B is not None and int(lengths_B.sum()) > max_total_tokens:
        raise ContractError(
            f"the responses have {int(lengths_B.sum())} tokens in all, over this service's limit of "
            f"{max_total_tokens} per request (send fewer samples per request)",
            "response_lengths" if ids_B is None else "response_token_ids",
        )


def check_evaluate_request(body: Any, max_total_tokens: int | None = None) -> EvaluateRequest:
    """A decoded body, checked against the contract, as the model; or :class:`ContractError`.

    The result's ``response_token_ids`` (when sent) are int32 arrays, and ``model_fields_set``
    names the fields the body had.
    """
    if not isinstance(body, Mapping):
        raise ContractError(f"body: expected an object with prompts and responses, got {type(body).__name__}", "body")
    fields = _validate_small_fields({key: _plain(body[key]) for key in _SMALL_FIELDS if key in body})
    batch_size = len(fields.prompts)
    for name in PER_SAMPLE_FIELDS:
        values = getattr(fields, name)
        if values is not None and len(values) != batch_size:
            raise ContractError(f"{name} has {len(values)} items but prompts has {batch_size} (one per sample)", name)
    token_ids = body.get("response_token_ids")
    ids_B = None if token_ids is None else _token_arrays(token_ids, batch_size)
    _check_lengths(fields, ids_B, max_total_tokens)
    if ids_B is not None:
        fields.response_token_ids = ids_B  # checked above; arrays, not lists of ints
    return fields


def parse_evaluation_request(body: Any, max_total_tokens: int | None = None) -> EvaluationRequest:
    """A decoded body -> :class:`~recipe.atropos.datatypes.EvaluationRequest` (defaults resolved),
    or :class:`ContractError` naming field and sizes."""
    fields = check_evaluate_request(body, max_total_tokens)
    ids_B = fields.response_token_ids
    lengths_B = None
    if ids_B is not None:
        lengths_B = np.fromiter((ids.size for ids in ids_B), dtype=np.int64, count=len(ids_B))
    elif fields.response_lengths is not None:
        lengths_B = np.asarray(fields.response_lengths, dtype=np.int64)
    batch_size = len(fields.prompts)
    return EvaluationRequest(
        prompts=fields.prompts,
        responses=fields.responses,
        group_ids=list(fields.group_ids) if fields.group_ids is not None else list(fields.prompts),
        ground_truths=list(fields.ground_truths) if fields.ground_truths is not None else [None] * batch_size,
        metadata=dict(fields.metadata or {}),
        response_token_ids=ids_B,
        response_lengths_B=lengths_B,
    )


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def evaluate_response(
    scores_B: np.ndarray, advantages: Sequence[SampleAdvantage], metrics: Mapping[str, float]
) -> EvaluateResponse:
    """An environment's answer as the wire model, unvalidated (the environment checked its sizes)."""
    return EvaluateResponse.model_construct(
        advantages=list(advantages),
        scores=np.asarray(scores_B, dtype=np.float64).tolist(),
        metrics={name: float(value) for name, value in metrics.items()},
    )
