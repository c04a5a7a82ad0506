"""The verl overlay: this repo's modules where it has them, the installed verl 0.9.1 everywhere else."""

from __future__ import annotations

import ast
import hashlib
import base64
import importlib.metadata
import importlib.util
import inspect
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import verl
from verl import _overlay
from verl.trainer.ppo import core_algos

from .conftest import PYTHON, REPO_ROOT, repo_env

SITE_VERL = Path(_overlay.installed_package_dir())
OVERLAY_MODULES = ["verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.ppo.core_algos", "verl.trainer.main_ppo"]


def _module_origins() -> dict[str, str]:
    import verl.trainer.ppo.core_algos
    import verl.trainer.ppo.ray_trainer

    return {
        "core_algos": verl.trainer.ppo.core_algos.__file__,
        "ray_trainer": verl.trainer.ppo.ray_trainer.__file__,
        "version": verl.__version__,
        "registry_grpo": verl.trainer.ppo.core_algos.get_adv_estimator_fn("grpo").__code__.co_filename,
    }


def _assert_overlay_origins(origins: dict[str, str]) -> None:
    assert Path(origins["core_algos"]).resolve() == REPO_ROOT / "verl/trainer/ppo/core_algos.py"
    assert Path(origins["registry_grpo"]).resolve() == REPO_ROOT / "verl/trainer/ppo/core_algos.py"
    assert Path(origins["ray_trainer"]).resolve() == SITE_VERL / "trainer/ppo/ray_trainer.py"
    assert "site-packages" in origins["ray_trainer"]
    assert origins["version"] == "0.9.1"


def test_driver_resolves_overlay_and_release():
    _assert_overlay_origins(_module_origins())
    # The installed __init__ ran: its exports and its environment default are there.
    assert verl.DataProto.__module__ == "verl.protocol"
    assert os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_worker_resolves_overlay_and_release():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        origins = ray.get(ray.remote(_module_origins).remote())
    finally:
        ray.shutdown()
    _assert_overlay_origins(origins)


def _load_pristine_upstream(module_name: str):
    """The installed release's module, loaded on its own under another name (nothing of the overlay)."""
    spec = importlib.util.spec_from_file_location(f"pristine_{module_name.replace('.', '_')}", _overlay.installed_source_file(module_name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same_code(a, b) -> bool:
    return a.__code__.co_code == b.__code__.co_code and a.__code__.co_consts == b.__code__.co_consts


def test_other_estimators_are_upstreams():
    pristine = _load_pristine_upstream("verl.trainer.ppo.core_algos")
    assert set(core_algos.ADV_ESTIMATOR_REGISTRY) == set(pristine.ADV_ESTIMATOR_REGISTRY)
    for name, fn in core_algos.ADV_ESTIMATOR_REGISTRY.items():
        if name == "grpo":
            assert fn is core_algos.compute_grpo_outcome_advantage
            assert not _same_code(fn, pristine.ADV_ESTIMATOR_REGISTRY[name])
            continue
        # Upstream's own code object, from the installed file, bound to the module's public name.
        assert Path(fn.__code__.co_filename).resolve() == SITE_VERL / "trainer/ppo/core_algos.py", name
        assert _same_code(fn, pristine.ADV_ESTIMATOR_REGISTRY[name]), name
        assert getattr(core_algos, fn.__name__) is fn, name
    # Non-estimator API is upstream's too.
    for attr in ("compute_policy_loss_vanilla", "agg_loss", "kl_penalty", "get_policy_loss_fn"):
        assert _same_code(getattr(core_algos, attr), getattr(pristine, attr)), attr


@pytest.mark.parametrize("name", ["grpo_vectorized", "rloo", "reinforce_plus_plus", "opo", "rloo_vectorized"])
def test_other_estimators_behave_as_upstream(name):
    pristine = _load_pristine_upstream("verl.trainer.ppo.core_algos")
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 7, generator=gen)
    mask = (torch.rand(12, 7, generator=gen) > 0.3).float()
    index = np.array([str(i // 4) for i in range(12)], dtype=object)
    kwargs = {"token_level_rewards": rewards, "response_mask": mask}
    fn = core_algos.get_adv_estimator_fn(name)
    params = inspect.signature(fn).parameters
    if "index" in params:
        kwargs["index"] = index
    if "config" in params and name == "reinforce_plus_plus":
        from verl.trainer.config import AlgoConfig

        kwargs["config"] = AlgoConfig(gamma=1.0)
    ours = fn(**kwargs)
    theirs = pristine.get_adv_estimator_fn(name)(**kwargs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_installed_release_is_untouched_and_not_shadowed_by_an_install():
    # Every file verl's wheel installed still has the hash its RECORD lists.
    dist = importlib.metadata.distribution("verl")
    checked = 0
    for f in dist.files:
        if f.hash is None or not f.name.endswith(".py"):
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(f.locate().read_bytes()).digest()).rstrip(b"=").decode()
        assert digest == f.hash.value, f"{f} was modified"
        checked += 1
    assert checked > 100
    # This project's install carries no `verl` files.
    ours = importlib.metadata.distribution("verl-recipe-atropos")
    assert not [f for f in ours.files or [] if str(f).startswith("verl/")]


def _function_bodies(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    bodies = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) > 1:
            bodies.add(ast.dump(ast.Module(body=node.body, type_ignores=[])))
    return bodies


def test_no_upstream_function_body_is_copied():
    upstream_bodies = set()
    for path in SITE_VERL.rglob("*.py"):
        upstream_bodies |= _function_bodies(path)
    ours = [p for p in REPO_ROOT.rglob("*.py") if not any(part.startswith(".venv") for part in p.parts) and "outputs" not in p.parts]
    copied = [(str(p), b[:80]) for p in ours for b in _function_bodies(p) & upstream_bodies]
    assert not copied


def _main_ppo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "verl.trainer.main_ppo", *args],
        cwd=REPO_ROOT,
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("trainer_cls", "needle"),
    [
        ("no_such_package.Trainer", "cannot be imported"),
        ("recipe.atropos.tests.trainer_probe.Missing", "cannot be imported"),
        ("recipe.atropos.tests.trainer_probe.NotATrainer", "not a subclass of verl.trainer.ppo.ray_trainer.RayPPOTrainer"),
    ],
)
def test_bad_trainer_cls_fails_before_ray_starts(trainer_cls, needle):
    result = _main_ppo(f"trainer_cls={trainer_cls}")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"trainer_cls={trainer_cls}" in output and needle in output
    assert "ray init kwargs" not in output and "Started a local Ray instance" not in output


def test_cfg_job_composes_verls_config_as_upstream_does():
    ours = _main_ppo("--cfg", "job", "algorithm.adv_estimator=grpo")
    assert ours.returncode == 0, ours.stderr
    # Upstream's own entry point, run from its installed file.
    upstream = subprocess.run(
        [PYTHON, _overlay.installed_source_file("verl.trainer.main_ppo"), "--cfg", "job", "algorithm.adv_estimator=grpo"],
        cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=120,
    )
    assert upstream.returncode == 0, upstream.stderr
    assert "actor_rollout_ref:" in ours.stdout and "adv_estimator: grpo" in ours.stdout
    assert ours.stdout == upstream.stdout


def test_cfg_job_accepts_trainer_cls_without_plus():
    result = _main_ppo("--cfg", "job", "trainer_cls=recipe.atropos.tests.trainer_probe.ProbeTrainer")
    assert result.returncode == 0, result.stderr
    assert "trainer_cls: recipe.atropos.tests.trainer_probe.ProbeTrainer" in result.stdout


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_trainer_cls_is_built_by_verls_task_runner(tiny_assets, tmp_path):
    probe_output = tmp_path / "probe.json"
    result = _main_ppo(
        "trainer_cls=recipe.atropos.tests.trainer_probe.ProbeTrainer",
        "algorithm.adv_estimator=grpo",
        f"data.train_files={tiny_assets.train_file}",
        f"data.val_files={tiny_assets.test_file}",
        "data.train_batch_size=4",
        "data.max_prompt_length=128",
        "data.max_response_length=32",
        f"actor_rollout_ref.model.path={tiny_assets.model_dir}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
        "trainer.n_gpus_per_node=1",
        "trainer.logger=[console]",
        "+ray_kwargs.ray_init.num_cpus=2",
        "+ray_kwargs.ray_init.include_dashboard=false",
        f"++probe_output={probe_output}",
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probe = json.loads(probe_output.read_text())
    assert probe["class"] == "recipe.atropos.tests.trainer_probe.ProbeTrainer"
    assert probe["init_workers_called"]
    # The same constructor arguments verl's TaskRunner gives RayPPOTrainer.
    assert probe["kwargs"] == sorted(
        ["config", "tokenizer", "processor", "role_worker_mapping", "resource_pool_manager",
         "ray_worker_group_cls", "train_dataset", "val_dataset", "collate_fn", "train_sampler"]
    )
    assert probe["train_dataset_len"] == 64
    assert probe["pid"] != os.getpid()  # built inside the TaskRunner actor, where the overlay also holds
    _assert_overlay_origins({**probe, "core_algos": probe["core_algos_file"], "ray_trainer": probe["ray_trainer_file"],
                             "version": "0.9.1", "registry_grpo": probe["core_algos_file"]})
