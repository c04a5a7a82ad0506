"""verl batch -> the environment service's request (prompt and response text, ids, groups, ground truths)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from recipe.atropos.protocol import EvaluateRequest
from verl import DataProto


@dataclasses.dataclass(frozen=True)
class BatchView:
    """The parts of a verl batch the request is built from, taken without copying.

    Taken on the trainer's thread; the request is then built on a background thread while verl goes
    on adding keys to the batch.
    """

    prompts_BP: torch.Tensor
    prompt_mask_BP: torch.Tensor
    responses_BT: torch.Tensor
    response_mask_BT: torch.Tensor
    uids_B: np.ndarray
    reward_model_B: np.ndarray | None

    @classmethod
    def of(cls, batch: DataProto) -> BatchView:
        prompts_BP = batch.batch["prompts"]
        return cls(
            prompts_BP=prompts_BP,
            prompt_mask_BP=batch.batch["attention_mask"][:, : prompts_BP.shape[1]],
            responses_BT=batch.batch["responses"],
            response_mask_BT=batch.batch["response_mask"],
            uids_B=batch.non_tensor_batch["uid"],
            reward_model_B=batch.non_tensor_batch.get("reward_model"),
        )

    def select(self, index_N: np.ndarray) -> BatchView:
        """The rows `index_N`, in that order (one environment's share of the batch)."""
        rows = torch.as_tensor(index_N, dtype=torch.long)
        return BatchView(
            prompts_BP=self.prompts_BP[rows],
            prompt_mask_BP=self.prompt_mask_BP[rows],
            responses_BT=self.responses_BT[rows],
            response_mask_BT=self.response_mask_BT[rows],
            uids_B=self.uids_B[index_N],
            reward_model_B=None if self.reward_model_B is None else self.reward_model_B[index_N],
        )


def _ground_truth(reward_model: Any) -> str | None:
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return str(reward_model["ground_truth"])
    return None


def build_environment_request(view: BatchView, tokenizer, *, send_token_ids: bool, step: int) -> EvaluateRequest:
    """Decode prompts and responses; the response tokens are those where `response_mask` is 1.

    The wire model, built unvalidated (the client checks it before sending): token ids are the
    responses' arrays; their lengths are sent instead when the ids are not.
    """
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(view.prompts_BP, view.prompt_mask_BP)]
    response_mask_BT = view.response_mask_BT.bool()
    response_ids = [ids[mask].numpy() for ids, mask in zip(view.responses_BT, response_mask_BT)]
    ground_truths = None
    if view.reward_model_B is not None:
        ground_truths = [_ground_truth(rm) for rm in view.reward_model_B]
        if all(gt is None for gt in ground_truths):
            ground_truths = None
    return EvaluateRequest.model_construct(
        prompts=tokenizer.batch_decode(prompt_ids, skip_special_tokens=True),
        responses=tokenizer.batch_decode([ids.tolist() for ids in response_ids], skip_special_tokens=True),
        group_ids=[str(uid) for uid in view.uids_B],
        ground_truths=ground_truths,
        response_token_ids=response_ids if send_token_ids else None,
        response_lengths=None if send_token_ids else response_mask_BT.sum(dim=-1).tolist(),
        metadata={"step": step},
    )
