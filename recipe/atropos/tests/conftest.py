"""Shared fixtures: offline tiny assets (built once per session) and the repo's paths."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]

# The vLLM tier's venv (.venv-vllm, `make test-vllm`) runs the `vllm` tests only and has no verifiers (the
# `verifiers` extra is the main venv's): the modules that import it are left out there. In .venv a
# missing verifiers stays a collection error.
if importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("verifiers") is None:
    collect_ignore_glob = ["test_verifiers_*.py"]


def repo_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess of this repo: repo root first on PYTHONPATH, no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from recipe.atropos.demo.tiny_assets import build_assets

    return build_assets(tmp_path_factory.mktemp("tiny_assets"), num_train=64, num_test=16)
