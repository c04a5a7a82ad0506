"""`make demo`: GRPO with advantages from the GSM8K environment service, on a CPU, in a few minutes.

    python -m recipe.atropos.demo [--config NAME] [--check] [--out outputs/demo] [--rollout hf|vllm] [hydra overrides...]

1. Builds the offline assets once (tiny tokenizer, tiny Qwen2 warmed up for a few seconds,
   GSM8K-style arithmetic problems) under <out>/assets.
2. Runs the launcher with config/gsm8k_grpo_cpu.yaml: the environment service (token-level
   advantages), then verl's trainer (RayGRPOAtroposTrainer) in CPU mode. Overrides go to both.
3. Prints one line per step (reward, accuracy, whether the environment's advantages were used),
   then a summary with the per-step timing breakdown; writes verl's metrics to
   <out>/metrics.jsonl and the plot to <out>/reward.png.
4. Measures what was learned on held-out prompts: verl's own validation, greedy, on the same 512
   test prompts before training and every 10 steps; "after training" is the mean of the second
   half's validations (steps 30, 40 and 50 of the 50).

`--config mixed_grpo_cpu` (`make demo ARGS="--config mixed_grpo_cpu"`) trains on two environments at
once: GSM8K-style problems through the GSM8K service and reasoning-gym's basic_arithmetic through the
reasoning-gym service, both started by the launcher; each step's line and reward.png show each
environment's reward (docs/many_environments.md). Its output goes to outputs/demo_mixed_grpo_cpu.

`--rollout vllm` (`make demo ROLLOUT=vllm`, from .venv-vllm) runs the same demo with verl's own vLLM
rollout on vLLM's CPU build: config/cpu/vllm.yaml is added to the config (`+cpu=vllm`).

Every process it starts is stopped at the end, on Ctrl-C too (the launcher's supervision).
`--check` exits 3 unless the greedy held-out accuracy after training (the mean of the second half's
validations) beats that before by at least run_report.MIN_HELDOUT_GAIN. Greedy decoding makes it a function of the
weights alone: a run with `actor_rollout_ref.actor.optim.lr=0` changes nothing and exits 3, a default
run passes at any `data.seed` (docs/cpu_mode.md: the spread over seeds).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recipe.atropos.demo.run_report import (
    HELDOUT_EVERY,
    MIN_HELDOUT_GAIN,
    StepFollower,
    format_step,
    plot_reward,
    read_steps,
    read_validation,
    summarize,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO_ROOT / "recipe/atropos/config"
DEFAULT_CONFIG = "gsm8k_grpo_cpu"
CONFIG = CONFIG_DIR / f"{DEFAULT_CONFIG}.yaml"
# --rollout: the overrides that select it (hf is gsm8k_grpo_cpu.yaml's own).
ROLLOUTS = {"hf": [], "vllm": ["+cpu=vllm"]}
# num_test: the held-out prompts --check compares before and after training. Sized from the spread of
# its statistic over 12 seeds (docs/cpu_mode.md#did-it-learn): sd 0.027, 0.023, 0.020, 0.016 with the
# first 64, 128, 256, 512 prompts; each validation of 512 takes 3-6 s.
ASSET_SETTINGS = {"num_train": 512, "num_test": 512, "seed": 0, "pretrain_steps": 300}
# The mixed demo's reasoning-gym test rows (its --check averages the two data sources' held-out scores).
REASONING_GYM_NUM_TEST = 64
# The held-out evaluation (verl's validation): greedy (val_kwargs), on data.val_files, before training and
# every 10 steps (trainer.test_freq, :func:`held_out_test_freq`; each costs 3-6 s for 512 prompts).
# The user's overrides come after these and win.
HELD_OUT_OVERRIDES = [
    "trainer.val_before_train=true",
    "actor_rollout_ref.rollout.val_kwargs.do_sample=false",
    "actor_rollout_ref.rollout.val_kwargs.temperature=0",
    "actor_rollout_ref.rollout.val_kwargs.n=1",
]


def ensure_assets(out: Path) -> Path:
    """Build the assets once; a stamp records the settings they were built with."""
    from recipe.atropos.demo.tiny_assets import build_assets

    assets_dir = out / "assets"
    stamp = assets_dir / "BUILT_WITH"
    settings = repr(sorted(ASSET_SETTINGS.items()))
    if stamp.exists() and stamp.read_text() == settings:
        return assets_dir
    print(f"demo: building the tiny model, tokenizer and data in {assets_dir} ...", flush=True)
    build_assets(assets_dir, **ASSET_SETTINGS)
    stamp.write_text(settings)
    return assets_dir


def ensure_reasoning_gym_data(assets_dir: Path) -> None:
    """reasoning-gym's basic_arithmetic rows for the mixed demo (a few seconds; stamped on their own,
    so the model is not rebuilt)."""
    from recipe.atropos.demo.tiny_assets import build_reasoning_gym_data

    settings = {"task": "basic_arithmetic", "num_train": ASSET_SETTINGS["num_train"],
                "num_test": REASONING_GYM_NUM_TEST, "seed": ASSET_SETTINGS["seed"]}
    stamp = assets_dir / "REASONING_GYM_BUILT_WITH"
    if stamp.exists() and stamp.read_text() == repr(sorted(settings.items())):
        return
    build_reasoning_gym_data(assets_dir, **settings)
    stamp.write_text(repr(sorted(settings.items())))


def config_file(name: str) -> Path:
    """``--config``: a name in recipe/atropos/config (``mixed_grpo_cpu``) or a .yaml path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*_cpu.yaml"))
        raise SystemExit(f"demo: --config {name!r}: no such config ({path}); CPU configs here: {known}")
    return path


def total_steps(config: Path, overrides: list[str]) -> int:
    """trainer.total_training_steps: the user's override, else the config's."""
    from omegaconf import OmegaConf

    for override in overrides:
        if override.lstrip("+").startswith("trainer.total_training_steps="):
            return int(override.split("=", 1)[1])
    steps = OmegaConf.select(OmegaConf.load(config), "trainer.total_training_steps")
    if steps is None:  # e.g. a user's config that takes it from its Hydra defaults
        raise SystemExit(f"demo: {config} sets no trainer.total_training_steps; fix: set it in that file, or pass "
                         "trainer.total_training_steps=N on the command line")
    return int(steps)


def held_out_test_freq(total_steps: int) -> int:
    """verl validates at every multiple of trainer.test_freq and at the last step: every
    run_report.HELDOUT_EVERY steps for a run of S >= 20 steps (so its second half holds two validations
    or more), at S alone for a shorter one."""
    return HELDOUT_EVERY if total_steps >= 2 * HELDOUT_EVERY else total_steps


def run(out: Path, overrides: list[str], rollout: str = "hf", config: Path = CONFIG) -> int:
    """Run the launcher, echoing each step as verl logs it; returns the launcher's exit code."""
    assets_dir = ensure_assets(out)
    ensure_reasoning_gym_data(assets_dir)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    total = total_steps(config, overrides)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # CPU mode (recipe/atropos/cpu): loaded by verl in every process, Ray workers included.
        "VERL_PLATFORM": "cpu",
        "VERL_USE_EXTERNAL_MODULES": "recipe.atropos.cpu",
        "VERL_FILE_LOGGER_PATH": str(metrics_path.resolve()),
        "VERL_CPU_MODEL_PATH": str((assets_dir / "model").resolve()),
        "VERL_CPU_TRAIN_FILES": str((assets_dir / "data/train.parquet").resolve()),
        "VERL_CPU_VAL_FILES": str((assets_dir / "data/test.parquet").resolve()),
        # The mixed demo's second environment (config/mixed_grpo_cpu.yaml).
        "VERL_CPU_RG_TRAIN_FILES": str((assets_dir / "data/reasoning_gym_train.parquet").resolve()),
        "VERL_CPU_RG_VAL_FILES": str((assets_dir / "data/reasoning_gym_test.parquet").resolve()),
        "RAY_DEDUP_LOGS": "1",
    }
    command = [
        sys.executable, str(REPO_ROOT / "recipe/atropos/launch_atropos_verl_services.py"),
        "--config", str(config), "--run-dir", str(out / "launch"),
        "+ray_kwargs.ray_init.include_dashboard=false",
        # A new Ray of its own: without an address ray.init() joins the last cluster `ray start`
        # recorded in /tmp/ray (another job's, on a shared machine).
        "++ray_kwargs.ray_init.address=local", *ROLLOUTS[rollout], *HELD_OUT_OVERRIDES,
        f"trainer.test_freq={held_out_test_freq(total)}", *overrides,
    ]
    print(f"demo: {config.stem}, {total} GRPO steps on CPU, {rollout} rollout; service and trainer logs in {out / 'launch'}",
          flush=True)
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=env)
    follower = StepFollower(metrics_path, validation=True)
    try:
        while launcher.poll() is None:
            for step in follower.new_steps():
                print(format_step(step, total), flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        launcher.send_signal(signal.SIGTERM)  # the launcher stops everything it started
        launcher.wait()
        raise
    for step in follower.new_steps():
        print(format_step(step, total), flush=True)
    return launcher.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.atropos.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="recipe config: a name in recipe/atropos/config (mixed_grpo_cpu: two environments) or a "
                             ".yaml path (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: outputs/demo, outputs/demo_<config> for another --config)")
    parser.add_argument("--rollout", choices=sorted(ROLLOUTS), default="hf",
                        help="hf: the recipe's Hugging Face rollout; vllm: verl's vLLM rollout (vLLM's CPU build, .venv-vllm)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 3 unless the greedy held-out accuracy after training (the second half's "
                             f"validations) beats that before by {MIN_HELDOUT_GAIN}")
    args, overrides = parser.parse_known_args(argv)
    config = config_file(args.config)
    if args.out is None:
        args.out = REPO_ROOT / ("outputs/demo" if config == CONFIG else f"outputs/demo_{config.stem}")
    args.out.mkdir(parents=True, exist_ok=True)
    returncode = run(args.out, overrides, args.rollout, config)
    metrics_path = args.out / "metrics.jsonl"
    steps = read_steps(metrics_path) if metrics_path.exists() else []
    if not steps:
        print(f"demo: no training step was logged (exit code {returncode}); see {args.out / 'launch'}", file=sys.stderr)
        return returncode or 1
    validation = read_validation(metrics_path)
    summary = summarize(steps, validation=validation)
    plot = plot_reward(steps, args.out / "reward.png", validation)
    print("\n=== summary ===")
    for line in summary.lines():
        print(line)
    print(f"metrics: {metrics_path}\nplot:    {plot}")
    if returncode:
        return returncode
    if args.check and math.isnan(summary.heldout_gain):
        print("demo: --check needs the held-out evaluation before training and at the last step: "
              "trainer.val_before_train=true and trainer.test_freq > 0 (the demo's own settings)", file=sys.stderr)
        return 3
    if args.check and not summary.improved:
        print(f"demo: did not learn: held-out accuracy {summary.heldout_before:.3f} before training, "
              f"{summary.heldout_after:.3f} after (--check needs +{MIN_HELDOUT_GAIN})", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
