"""Shared fixtures: offline tiny assets (built once per session) and the repo's paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


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
