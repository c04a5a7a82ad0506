"""Requests that reach the policy while new weights are being loaded wait for them; none fails."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from recipe.atropos.cpu.hf_generation import HFGenerator, SamplingSettings
from recipe.atropos.cpu.policy_service import PolicyService
from recipe.atropos.tests.cpu_probe import PROBE_TEXT


class _SlowLoadGenerator(HFGenerator):
    """Loading weights takes until the test says so: a swap in progress, held open."""

    loading = threading.Event()
    release = threading.Event()

    def load_weights(self, named_tensors):
        self.loading.set()
        assert self.release.wait(30)
        return super().load_weights(named_tensors)


@pytest.mark.timeout(120)
def test_requests_during_a_weight_swap_wait_and_see_the_new_weights(tiny_assets):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_assets.model_dir))
    generator = _SlowLoadGenerator.from_pretrained(tiny_assets.model_dir, max_model_len=160)
    service = PolicyService(generator, tokenizer, "tiny")
    prompt = tokenizer(PROBE_TEXT)["input_ids"]
    greedy = SamplingSettings(temperature=0.0, max_tokens=8)

    async def scenario():
        before = (await service.generate([prompt], greedy))[0]
        embedding = generator.model.get_input_embeddings().weight
        service.stage_weights([("lm_head.weight", embedding.detach() + 2.0 * torch.randn_like(embedding))])
        swap = asyncio.create_task(service.commit_weights(global_steps=7))
        await asyncio.to_thread(generator.loading.wait, 30)  # the swap has started and holds the model
        during = asyncio.create_task(service.generate([prompt], greedy))
        await asyncio.sleep(0.5)
        assert not during.done()  # waiting, not failed
        generator.release.set()
        await swap
        after = (await during)[0]
        return before, after

    before, after = asyncio.run(scenario())
    assert service.weight_version == 1 and service.global_steps == 7
    # The waiting request was answered by the new weights (its tokens or their log-probs differ).
    assert (after.token_ids, after.log_probs) != (before.token_ids, before.log_probs)
    expected = HFGenerator.from_pretrained(tiny_assets.model_dir, max_model_len=160)
    expected.load_weights([("lm_head.weight", generator.model.get_input_embeddings().weight.detach().clone())])
    again = expected.generate([prompt], greedy)[0]
    assert again.token_ids == after.token_ids
    assert again.log_probs == pytest.approx(after.log_probs, abs=1e-5)
