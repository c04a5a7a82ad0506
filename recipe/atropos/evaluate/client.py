"""Client of an environment service (docs/PROTOCOL.md): health, evaluation, inference endpoint registration.

Every call goes through the retry policy of :class:`~recipe.atropos.http_retry.RetryingClient`.
A request is checked before it is sent, by the protocol's own checks
(:func:`recipe.atropos.protocol.check_evaluate_request`, which the service runs too), so a
caller's mistake is an :class:`~recipe.atropos.errors.AtroposRequestError` naming the field, not
a round trip. An answer is read sample by sample (:mod:`recipe.atropos.evaluate.answer`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from recipe.atropos import protocol, wire
from recipe.atropos.datatypes import EvaluationResult
from recipe.atropos.errors import AtroposAPIError, AtroposProtocolError, AtroposRequestError, ContractError
from recipe.atropos.evaluate.answer import parse_evaluation
from recipe.atropos.http_retry import Answer, RetryingClient

__all__ = ["AtroposEnvironmentClient", "Encoding", "request_payload"]

logger = logging.getLogger("verl.recipe.atropos")

Encoding = Literal["auto", "json", "msgpack"]

# Preferred answer encoding: msgpack carries per-token arrays as raw bytes; JSON always works.
_ACCEPT_COMPACT = f"{wire.MSGPACK}, {wire.JSON};q=0.5"


class AtroposEnvironmentClient(RetryingClient):
    """Client of one environment service.

    Args: those of :class:`~recipe.atropos.http_retry.RetryingClient` (URL, timeouts, retries,
    API key), and
        encoding: request bodies in ``"json"``, ``"msgpack"``, or ``"auto"``: msgpack once a health
            check saw the service advertise it and the request carries token arrays, JSON
            otherwise. Answers are decoded in whatever encoding the service chose.
    """

    def __init__(self, *args: Any, encoding: Encoding = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if encoding not in ("auto", "json", "msgpack"):
            raise ValueError(f"encoding must be 'auto', 'json' or 'msgpack', got {encoding!r}")
        self.encoding: Encoding = encoding
        # What the last healthy /health said: its body and the encodings it advertised.
        self.service_info: dict[str, Any] = {}
        self.service_encodings: tuple[str, ...] = ()

    def health_check(self, timeout_s: float | None = None) -> bool:
        """True when ``GET /health`` answers 200 with ``"status": "ok"``; one attempt, never raises.

        ``timeout_s`` caps this probe below ``timeout`` (a quick check during an outage). Also
        records the encodings the service advertises, which ``encoding="auto"`` relies on.
        """

        def healthy(answer: Answer) -> dict[str, Any]:
            body = answer.body
            if not isinstance(body, Mapping) or body.get("status") != "ok":
                raise AtroposProtocolError(f"GET {self.api_url}/health: not ok: {body!r:.200}", field="status")
            return dict(body)

        try:
            body = self._request(
                "GET", protocol.HEALTH_PATH, accept=self._accept_header(), max_attempts=1, max_wait_s=timeout_s,
                parse=healthy,
            )
        except AtroposAPIError as exc:
            logger.debug("health check of %s failed: %s", self.api_url, exc)
            return False
        self.service_info = body
        encodings = body.get("encodings")
        if isinstance(encodings, Sequence) and not isinstance(encodings, str):
            self.service_encodings = tuple(str(e).lower() for e in encodings)
        else:
            self.service_encodings = (wire.JSON,)
        return True

    def evaluate_and_compute_advantages(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        group_ids: Sequence[str | int] | None = None,
        ground_truths: Sequence[str | None] | None = None,
        response_token_ids: Sequence[Sequence[int] | np.ndarray] | None = None,
        response_lengths: Sequence[int] | None = None,
    ) -> EvaluationResult:
        """Score B responses and get their advantages (``POST /evaluate_and_compute_advantages``).

        The request is checked before it is sent (every list has B items of the right type), so a
        caller's mistake is an :class:`AtroposRequestError` naming the field, not a round trip.
        Token ids travel as int32 arrays (raw bytes in msgpack).
        """
        payload = request_payload(
            prompts, responses, metadata, group_ids, ground_truths, response_token_ids, response_lengths
        )
        batch_size = len(payload["prompts"])
        where = f"POST {self.api_url}{protocol.EVALUATE_PATH}"
        return self._request(
            "POST",
            protocol.EVALUATE_PATH,
            payload=payload,
            content_type=self._request_content_type(carries_arrays="response_token_ids" in payload),
            accept=self._accept_header(),
            parse=lambda answer: parse_evaluation(answer.body, batch_size, where),
        )

    def evaluate(self, request: protocol.EvaluateRequest) -> EvaluationResult:
        """:meth:`evaluate_and_compute_advantages` of a request built as the wire model (unvalidated is fine)."""
        return self.evaluate_and_compute_advantages(
            **{name: getattr(request, name) for name in protocol.EvaluateRequest.model_fields}
        )

    def register_inference_endpoint(self, base_url: str, model: str, api_key: str | None = None) -> bool:
        """Tell the service where an OpenAI-compatible server is; False when it does not support it (404)."""
        # Built, not validated: the service judges the values (a bad one is its 422).
        payload = dict(protocol.RegisterInferenceEndpointRequest.model_construct(base_url=base_url, model=model, api_key=api_key))
        answer = self._request(
            "POST", protocol.REGISTER_PATH, payload=payload, accept=self._accept_header(), accept_statuses={404}
        )
        if answer.status == 404:
            logger.info("%s does not support %s (404)", self.api_url, protocol.REGISTER_PATH)
            return False
        body = answer.body
        return bool(body.get("registered", True)) if isinstance(body, Mapping) else True

    # ---- encoding choice ----------------------------------------------------------------

    def _accept_header(self) -> str:
        return wire.JSON if self.encoding == "json" else _ACCEPT_COMPACT

    def _request_content_type(self, *, carries_arrays: bool) -> str:
        """msgpack when chosen, or (auto) when the service advertised it and there are arrays to carry."""
        if self.encoding == "msgpack":
            return wire.MSGPACK
        if self.encoding == "auto" and carries_arrays and wire.MSGPACK in self.service_encodings:
            return wire.MSGPACK
        return wire.JSON


def request_payload(
    prompts: Sequence[str],
    responses: Sequence[str],
    metadata: Mapping[str, Any] | None,
    group_ids: Sequence[str | int] | None,
    ground_truths: Sequence[str | None] | None,
    response_token_ids: Sequence[Sequence[int] | np.ndarray] | None,
    response_lengths: Sequence[int] | None,
) -> dict[str, Any]:
    """The body of an evaluation request, checked as the service checks it; token ids as int32 arrays."""
    given = {
        "prompts": prompts,
        "responses": responses,
        "metadata": dict(metadata) if isinstance(metadata, Mapping) else metadata,
        "group_ids": group_ids,
        "ground_truths": ground_truths,
        "response_token_ids": response_token_ids,
        "response_lengths": response_lengths,
    }
    try:
        fields = protocol.check_evaluate_request({name: value for name, value in given.items() if value is not None})
    except ContractError as exc:
        raise AtroposRequestError(f"invalid request, not sent: {exc.message}", status=None, code="invalid") from exc
    return {name: getattr(fields, name) for name in protocol.EvaluateRequest.model_fields if name in fields.model_fields_set}
