"""The offline assets: deterministic, loadable the way verl loads them, and in verl's RL data format."""

from __future__ import annotations

import hashlib

import pandas as pd
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from recipe.atropos.demo.tiny_assets import build_assets


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builds_are_deterministic(tmp_path):
    first = build_assets(tmp_path / "a", num_train=32, num_test=8, pretrain_steps=5)
    second = build_assets(tmp_path / "b", num_train=32, num_test=8, pretrain_steps=5)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _digest(first.model_dir / name) == _digest(second.model_dir / name), name
    assert _digest(first.train_file) == _digest(second.train_file)
    untrained = build_assets(tmp_path / "c", num_train=32, num_test=8, pretrain_steps=0)
    assert _digest(untrained.model_dir / "model.safetensors") != _digest(first.model_dir / "model.safetensors")


def test_tokenizer_ids_are_the_same_however_it_is_loaded(tiny_assets):
    auto = AutoTokenizer.from_pretrained(tiny_assets.model_dir)  # a Qwen2Tokenizer, as verl loads it
    fast = PreTrainedTokenizerFast.from_pretrained(tiny_assets.model_dir)
    text = "Mia has 9 - 4 = <<9-4=5>>5 coins.\n#### 5 and \\boxed{12}"
    assert auto(text).input_ids == fast(text).input_ids
    assert auto.decode(auto(text).input_ids) == text
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    assert model.config.head_dim == 32 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_data_is_in_verls_rl_format(tiny_assets):
    frame = pd.read_parquet(tiny_assets.train_file)
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = frame.iloc[0]
    assert row.prompt[0]["role"] == "user" and "####" in row.prompt[0]["content"]
    assert row.extra_info["answer"].endswith(f"#### {row.reward_model['ground_truth']}")
    assert len(frame) == 64
