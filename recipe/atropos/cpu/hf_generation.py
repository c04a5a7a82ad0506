"""Token-in, token-out sampling with a Hugging Face causal LM: the compute behind the HF rollout.

`HFGenerator` wraps one model for what a rollout server needs: sample completions with
`model.generate()` (a batch of prompts at once, left-padded), return per-token log-probs of the
sampled tokens, score a fixed token sequence, and take new weights by name. It knows nothing of Ray,
HTTP or verl, and is not thread-safe: `PolicyService` serialises access.

Log-probs are the "processed" ones (verl's default `rollout.logprobs_mode`, as vLLM computes them):
log-softmax of the logits after temperature, top-k and top-p, i.e. of the distribution actually
sampled from. At temperature 1 with no top-k/top-p they equal what the actor computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How to sample one completion. temperature <= 0 means greedy; top_k <= 0 and top_p >= 1 mean off."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    # Per-request seed: the same seed, prompt and weights give the same completions.
    seed: int | None = None
    # How many most likely tokens to report per position (0: only the sampled token's log-prob).
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one `generate()` call (seeded ones never do)."""
        return dataclasses.astuple(dataclasses.replace(self, max_tokens=0))


@dataclasses.dataclass
class Completion:
    """One sampled continuation: response token ids (EOS included when it stopped on one)."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str
    # Per position, {token_id: log_prob} of the `top_logprobs` most likely tokens (empty when not asked).
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)


class HFGenerator:
    """One causal LM on CPU, sampling through `generate()`."""

    def __init__(self, model: torch.nn.Module, eos_token_ids: Sequence[int], pad_token_id: int, max_model_len: int):
        self.model = model.eval()
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.max_model_len = int(max_model_len)

    @classmethod
    def from_pretrained(
        cls, model_path: str | Path, *, max_model_len: int | None = None, dtype: torch.dtype = torch.float32
    ) -> HFGenerator:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, attn_implementation="sdpa")
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos_ids or [0])[0]
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        return cls(model, eos_ids, pad, min(max_model_len or limit, limit))

    # -- sampling -----------------------------------------------------------------------------

    def max_new_tokens(self, prompt_len: int, requested: int) -> int:
        """`requested`, clamped to [1, room left in the context]; raises when no room is left."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room in a context of {self.max_model_len}")
        return max(1, min(int(requested), room))

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> list[Completion]:
        """One completion per prompt, all in one `generate()` call (left-padded batch)."""
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        max_new = self.max_new_tokens(longest, settings.max_tokens)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError("empty prompt")
            input_ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, longest - len(prompt) :] = 1
        with self._seeded(settings.seed):
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(settings, max_new),
            )
        new_tokens = output.sequences[:, longest:]
        # scores: one (batch, vocab) tensor per new position, after temperature/top-k/top-p.
        step_logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in output.scores], dim=1)
        return [
            self._completion(new_tokens[row].tolist(), step_logprobs[row], max_new, settings.top_logprobs)
            for row in range(len(prompts))
        ]

    def _completion(self, tokens: list[int], logprobs: torch.Tensor, max_new: int, top_n: int) -> Completion:
        length = len(tokens)
        finish = FINISH_LENGTH
        for i, token in enumerate(tokens):
            if token in self.eos_token_ids:
                length, finish = i + 1, FINISH_STOP
                break
        tokens = tokens[:length]
        if finish == FINISH_LENGTH and length < max_new:
            finish = FINISH_STOP  # a stopping criterion other than EOS ended it early
        chosen = logprobs[torch.arange(length), torch.tensor(tokens, dtype=torch.long)].tolist() if tokens else []
        top: list[dict[int, float]] = []
        if top_n > 0 and tokens:
            values, indices = logprobs[:length].topk(min(top_n, logprobs.shape[-1]), dim=-1)
            top = [dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]
        return Completion(token_ids=tokens, log_probs=chosen, finish_reason=finish, top_logprobs=top)

    def _generation_config(self, settings: SamplingSettings, max_new_tokens: int):
        from transformers import GenerationConfig

        # Every sampling field is set explicitly: generate() fills unset (None) ones from the model's
        # own generation_config.json, which must not change what the trainer asked for.
        common = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_ids or None,
            pad_token_id=self.pad_token_id,
            repetition_penalty=float(settings.repetition_penalty),
            output_scores=True,
            return_dict_in_generate=True,
            num_beams=1,
        )
        if settings.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=float(settings.temperature),
            top_p=float(settings.top_p) if settings.top_p < 1 else 1.0,
            top_k=int(settings.top_k) if settings.top_k > 0 else 0,
            **common,
        )

    @staticmethod
    @contextlib.contextmanager
    def _seeded(seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        # The process RNG is left as it was: a seeded request does not perturb unseeded ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            yield

    # -- scoring ------------------------------------------------------------------------------

    @torch.no_grad()
    def prompt_logprobs(
        self, token_ids: Sequence[int], top_n: int = 0
    ) -> tuple[list[float | None], list[dict[int, float] | None]]:
        """Log-prob of each token given the ones before it (None for the first), raw logits, temperature 1."""
        if not token_ids:
            return [], []
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)[:-1]
        chosen = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()
        top: list[dict[int, float] | None] = [None]
        if top_n > 0:
            values, indices = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
            top += [dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]
        else:
            top += [None] * len(chosen)
        return [None, *chosen], top

    # -- weights ------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors into the parameters/buffers of the same (Hugging Face) names; returns how many.

        Tied weights (e.g. `lm_head.weight` and `model.embed_tokens.weight`) are one tensor under two
        names: either name updates both. An unknown name is an error (nothing is half-applied).
        """
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        pending = list(named_tensors)
        unknown = [name for name, _ in pending if name not in targets]
        if unknown:
            raise KeyError(f"weights with no matching parameter in the rollout model: {unknown[:10]}")
        mismatched = [
            f"{name}: {tuple(tensor.shape)} != {tuple(targets[name].shape)}"
            for name, tensor in pending
            if tuple(tensor.shape) != tuple(targets[name].shape)
        ]
        if mismatched:
            raise ValueError(f"weights whose shape differs from the rollout model's: {mismatched[:10]}")
        for name, tensor in pending:
            target = targets[name]
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        return len(pending)
