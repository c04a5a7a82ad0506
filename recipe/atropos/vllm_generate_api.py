"""vLLM's native `/generate` request and answer, as atroposlib's `server_type: vllm` uses them.

atroposlib's `VLLMServer` posts ``{"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, "n",
"max_tokens", "temperature", ...}`` to ``<base_url without /v1>/generate`` (Atropos' own
`vllm_api_server.py` serves it) and reads ``token_ids``, ``finish_reasons`` and ``logprobs`` (per
completion, per token ``[{"<token_id>": logprob}]``). The CPU policy server answers it directly; the
policy gateway (policy_gateway.py) translates it to vLLM's OpenAI `/v1/completions` for verl's vLLM
servers, which do not serve `/generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    """The request fields honoured (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    prompt: dict[str, list[int]] | str
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    n: int = Field(default=1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float = Field(default=1.0, gt=0.0)

    def prompt_token_ids(self) -> list[int] | None:
        """The prompt's token ids, or None when it came as text."""
        if isinstance(self.prompt, str):
            return None
        if "prompt_token_ids" not in self.prompt:
            raise ValueError("prompt must be text or {'prompt_token_ids': [...]}")
        return list(self.prompt["prompt_token_ids"])

    def sampling_fields(self) -> dict[str, Any]:
        """The sampling settings under their OpenAI/vLLM completions names."""
        return self.model_dump(include={"max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "repetition_penalty"})


def generate_answer(
    prompt_token_ids: list[int],
    texts: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    log_probs: Sequence[Sequence[float]],
    finish_reasons: Sequence[str],
) -> dict[str, Any]:
    """The `/generate` answer for the completions of one prompt (lists aligned by completion)."""
    for tokens, lps in zip(token_ids, log_probs):
        if len(tokens) != len(lps):
            raise ValueError(f"a completion has {len(tokens)} tokens but {len(lps)} log-probs")
    return {
        "prompt_token_ids": list(prompt_token_ids),
        "text": list(texts),
        "token_ids": [list(tokens) for tokens in token_ids],
        "finish_reasons": list(finish_reasons),
        "logprobs": [[[{str(t): float(lp)}] for t, lp in zip(tokens, lps)] for tokens, lps in zip(token_ids, log_probs)],
    }
