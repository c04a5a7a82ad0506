"""The native `/generate` dialects that atroposlib's server types post for tokens and log-probs.

- `server_type: vllm` (`VLLMServer`): vLLM's native request, as Atropos' own `vllm_api_server.py`
  serves it: ``{"prompt": {"prompt_token_ids": [...]} | "text", "n", "max_tokens", "temperature",
  ..., "logprobs": 0}``; the answer has ``token_ids``, ``finish_reasons`` and ``logprobs`` (per
  completion, per token ``[{"<token_id>": logprob}]``).
- `server_type: sglang` (`SGLangServer`): SGLang's native request, ``{"input_ids": [...] | "text":
  "...", "sampling_params": {"n", "max_new_tokens", "temperature", ...}, "return_logprob": true}``;
  the answer is one object per completion (a list when ``n`` > 1) with ``text`` and
  ``meta_info.output_token_logprobs`` ``[[logprob, token_id, null], ...]`` and
  ``meta_info.finish_reason`` ``{"type": "stop" | "length"}``.

- Token-in (`POST /inference/v1/generate`, vLLM's and verifiers' training client's, also used by the
  episode runners of recipe/atropos/episodes): ``{"model", "token_ids": [...], "sampling_params":
  {"max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop_token_ids", "logprobs", ...}}``;
  the answer has ``request_id``, ``prompt_token_ids`` and per completion ``choices[i]`` with
  ``token_ids``, ``finish_reason`` and ``logprobs.content`` ``[{"token": "token_id:<id>", "logprob"}]``.
  Its own route, :class:`TokenInGenerateRequest` (its ``sampling_params`` would read as SGLang's).

`parse_generate_request` tells them apart (SGLang's has ``input_ids``, ``text`` or
``sampling_params``); both give the prompt and the sampling settings under OpenAI's completions
names, and build their own answer from `Sample`s. The CPU policy server answers them itself; the
policy gateway (trajectory/gateway.py) sends them to `/v1/completions` of verl's vLLM servers, which do
not serve `/generate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion: its text, tokens, their log-probs and why it stopped ("stop"/"length")."""

    text: str
    token_ids: Sequence[int]
    log_probs: Sequence[float]
    finish_reason: str

    def __post_init__(self):
        if len(self.token_ids) != len(self.log_probs):
            raise ValueError(f"a completion has {len(self.token_ids)} tokens but {len(self.log_probs)} log-probs")


class SamplingFields(BaseModel):
    """The sampling settings honoured, under OpenAI's completions names (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    n: int = Field(default=1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's: the completion ends with the first of these
    repetition_penalty: float = Field(default=1.0, gt=0.0)


class VLLMGenerateRequest(SamplingFields):
    prompt: dict[str, list[int]] | str

    @property
    def prompt_token_ids(self) -> list[int] | None:
        """The prompt's token ids, or None when it came as text."""
        if isinstance(self.prompt, str):
            return None
        if "prompt_token_ids" not in self.prompt:
            raise ValueError("prompt must be text or {'prompt_token_ids': [...]}")
        return list(self.prompt["prompt_token_ids"])

    @property
    def prompt_text(self) -> str | None:
        return self.prompt if isinstance(self.prompt, str) else None

    @property
    def sampling(self) -> SamplingFields:
        return SamplingFields(**self.model_dump(exclude={"prompt"}))

    def answer(self, prompt_token_ids: Sequence[int], samples: Sequence[Sample]) -> dict[str, Any]:
        return {
            "prompt_token_ids": list(prompt_token_ids),
            "text": [s.text for s in samples],
            "token_ids": [list(s.token_ids) for s in samples],
            "finish_reasons": [s.finish_reason for s in samples],
            "logprobs": [[[{str(t): float(lp)}] for t, lp in zip(s.token_ids, s.log_probs)] for s in samples],
        }


class _SGLangSampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    n: int = Field(default=1, ge=1, le=128)
    sampling_seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float = Field(default=1.0, gt=0.0)


class SGLangGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_ids: list[int] | None = None
    text: str | None = None
    sampling_params: _SGLangSampling = Field(default_factory=_SGLangSampling)

    @property
    def prompt_token_ids(self) -> list[int] | None:
        if self.input_ids is None and self.text is None:
            raise ValueError("give the prompt as input_ids or text")
        return None if self.input_ids is None else list(self.input_ids)

    @property
    def prompt_text(self) -> str | None:
        return None if self.input_ids is not None else self.text

    @property
    def sampling(self) -> SamplingFields:
        params = self.sampling_params.model_dump()
        params["max_tokens"] = params.pop("max_new_tokens")
        params["seed"] = params.pop("sampling_seed")
        return SamplingFields(**params)

    def answer(self, prompt_token_ids: Sequence[int], samples: Sequence[Sample]) -> dict[str, Any] | list[dict[str, Any]]:
        answers = [
            {
                "text": s.text,
                "output_ids": list(s.token_ids),
                "meta_info": {
                    "prompt_tokens": len(prompt_token_ids),
                    "completion_tokens": len(s.token_ids),
                    "output_token_logprobs": [[float(lp), int(t), None] for t, lp in zip(s.token_ids, s.log_probs)],
                    "finish_reason": {"type": s.finish_reason},
                },
            }
            for s in samples
        ]
        return answers if self.sampling_params.n > 1 else answers[0]


class _TokenInSampling(SamplingFields):
    max_tokens: int = Field(default=16, ge=1)


class TokenInGenerateRequest(BaseModel):
    """`POST /inference/v1/generate`: the prompt as exact token ids, never re-tokenized."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    token_ids: list[int] = Field(min_length=1)
    sampling_params: _TokenInSampling = Field(default_factory=_TokenInSampling)

    def completions_body(self) -> dict[str, Any]:
        """The `/v1/completions` request for the same prompt and sampling, asking for token ids and the
        sampled tokens' log-probs (vLLM's `return_token_ids`, `logprobs: 0`)."""
        body = {**self.sampling_params.model_dump(exclude_none=True), "prompt": list(self.token_ids)}
        return {**body, "logprobs": 0, "return_token_ids": True}

    @staticmethod
    def answer(request_id: str, prompt_token_ids: Sequence[int], samples: Sequence[Sample]) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "prompt_token_ids": list(prompt_token_ids),
            "choices": [
                {
                    "index": index,
                    "text": s.text,
                    "token_ids": list(s.token_ids),
                    "finish_reason": s.finish_reason,
                    "logprobs": {"content": [{"token": f"token_id:{t}", "logprob": float(lp)}
                                             for t, lp in zip(s.token_ids, s.log_probs)]},
                }
                for index, s in enumerate(samples)
            ],
        }


NativeGenerateRequest = VLLMGenerateRequest | SGLangGenerateRequest


def parse_generate_request(body: Mapping[str, Any]) -> NativeGenerateRequest:
    """The request in whichever dialect `body` is; ValueError (pydantic's ValidationError
    included) when it is neither. Accessing the prompt checks it is there."""
    if not isinstance(body, Mapping):
        raise ValueError("the /generate body must be a JSON object")
    if {"input_ids", "text", "sampling_params"} & set(body):
        request: NativeGenerateRequest = SGLangGenerateRequest.model_validate(body)
    else:
        request = VLLMGenerateRequest.model_validate(body)
    request.prompt_token_ids  # noqa: B018 - raises on a prompt in neither form
    return request


def completions_body(request: NativeGenerateRequest) -> dict[str, Any]:
    """The OpenAI/vLLM `/v1/completions` request for the same prompt and sampling settings."""
    prompt = request.prompt_token_ids
    return {**request.sampling.model_dump(), "prompt": prompt if prompt is not None else request.prompt_text}
