"""Separate against colocated rollout placement in trajectory mode, same config, same run, on CPU:

    loopback-only .venv/bin/python -m recipe.atropos.benchmarks.bench_placement [--pairs 1] [--steps 12]

Both arms run the launcher with the separate demo's config, config/separate_trajectory_cpu.yaml
(atroposlib's run-api, the trainer, the repo's atroposlib GSM8K environment generating through the
policy gateway, the demo's tiny model, 8 groups x 8 answers per step, max_staleness 1, verl's
token-level rollout correction): `separate` as it is (the HF rollout server on a logical GPU slot,
i.e. a process, of its own), `colocated` with the placement's four keys set back (`COLOCATED`);
nothing else differs. The arms alternate, one whole run each,
so that both see the same machine load; each run's first `--warmup` steps (start-up, the
environment's first groups) are left out. Printed, never asserted:

- steps per minute: kept steps / the sum of their `timing_s/step`;
- trainer idle fraction: the share of those seconds the trainer waited for its batch
  (`atropos/wait_s`, i.e. for the environments);
- the phases (medians): wait, old log-prob, update, weight sync (`timing_s/update_weights`);
- separate only: the share of each actor update the gateway served requests during
  (`atropos/async/update_served_fraction`), the gateway's pause per swap, the mean staleness;
- the timing model (placement/timing_model.py) on the colocated arm's phases, with the separate
  arm's measured pause: 4 + 4 separate devices against 8 colocated.

Two cores hold the trainer, the rollout server, the environment and run-api in both arms: the
overlap separate placement buys on devices of their own is, here, time-sharing of the same cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
from pathlib import Path

from recipe.atropos.demo.cli import CONFIG_DIR, ensure_assets
from recipe.atropos.demo.run_report import read_steps
from recipe.atropos.placement.timing_model import phase_times, predictions
from recipe.atropos.server_process import REPO_ROOT, find_free_loopback_port

CONFIG = CONFIG_DIR / "separate_trajectory_cpu.yaml"
# What config/placement/separate_cpu.yaml sets, set back.
COLOCATED = ["trainer.atropos.rollout_placement=colocated", "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
             "actor_rollout_ref.rollout.nnodes=0", "ray_kwargs.ray_init.num_gpus=1"]
ARMS = {"colocated": COLOCATED, "separate": []}
PHASES = {"wait for batch": "atropos/wait_s", "old log-prob": "timing_s/old_log_prob",
          "update": "timing_s/update_actor", "weight sync": "timing_s/update_weights", "step": "timing_s/step"}


@dataclasses.dataclass
class Run:
    arm: str
    steps: list[dict]  # verl's metrics of the kept steps


def run_env(assets_dir: Path, metrics_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1",
        "VERL_FILE_LOGGER_PATH": str(metrics_path),
        "VERL_CPU_MODEL_PATH": str(assets_dir / "model"),
        "VERL_CPU_TRAIN_FILES": str(assets_dir / "data/train.parquet"),
        "VERL_CPU_VAL_FILES": str(assets_dir / "data/test.parquet"),
    }


def run_arm(arm: str, index: int, args: argparse.Namespace, assets_dir: Path) -> Run:
    """One whole launcher run of `arm`; its steps after the warm-up."""
    metrics_path = (args.out / f"run{index:02d}_{arm}.jsonl").resolve()
    metrics_path.unlink(missing_ok=True)
    argv = [sys.executable, str(REPO_ROOT / "recipe/atropos/launch_atropos_verl_services.py"), "--config", str(CONFIG),
            "--run-dir", str(args.out / f"run{index:02d}_{arm}"), "+ray_kwargs.ray_init.include_dashboard=false",
            "++ray_kwargs.ray_init.address=local", f"trainer.total_training_steps={args.steps}",
            f"launcher.trajectory_api.port={find_free_loopback_port()}",
            f"trainer.atropos.policy_gateway_port={find_free_loopback_port()}", *ARMS[arm], *args.overrides]
    with open(metrics_path.with_suffix(".log"), "w") as log:
        code = subprocess.run(argv, cwd=REPO_ROOT, env=run_env(assets_dir, metrics_path), stdout=log,
                              stderr=subprocess.STDOUT, timeout=args.run_timeout_s).returncode
    steps = read_steps(metrics_path) if metrics_path.exists() else []
    if code != 0 or len(steps) != args.steps:
        raise SystemExit(f"bench: the {arm} run exited {code} after {len(steps)}/{args.steps} steps; see "
                         f"{args.out / f'run{index:02d}_{arm}'}")
    return Run(arm, steps[args.warmup:])


def _median(runs: list[Run], key: str) -> float:
    values = [s[key] for r in runs for s in r.steps if key in s]
    return statistics.median(values) if values else float("nan")


def throughput(runs: list[Run]) -> tuple[float, float]:
    """(steps per minute, trainer idle fraction) over every kept step of `runs`."""
    steps = [s for r in runs for s in r.steps]
    seconds = sum(s["timing_s/step"] for s in steps)
    return 60 * len(steps) / seconds, sum(s["atropos/wait_s"] for s in steps) / seconds


def report(runs: list[Run]) -> None:
    by_arm = {arm: [r for r in runs if r.arm == arm] for arm in ARMS}
    rates = {arm: throughput(arm_runs) for arm, arm_runs in by_arm.items()}
    kept = {arm: sum(len(r.steps) for r in arm_runs) for arm, arm_runs in by_arm.items()}
    print(f"\nkept steps: {kept}")
    print(f"  {'':<24} {'colocated':>10} {'separate':>10} {'sep/col':>8}")
    (col_rate, col_idle), (sep_rate, sep_idle) = rates["colocated"], rates["separate"]
    print(f"  {'steps per minute':<24} {col_rate:10.2f} {sep_rate:10.2f} {sep_rate / col_rate:7.2f}x")
    print(f"  {'trainer idle fraction':<24} {col_idle:10.3f} {sep_idle:10.3f}")
    for phase, key in PHASES.items():
        col, sep = _median(by_arm["colocated"], key), _median(by_arm["separate"], key)
        print(f"  {phase + ' (median s)':<24} {col:10.3f} {sep:10.3f} {sep / col if col else float('nan'):7.2f}x")
    separate = by_arm["separate"]
    pause = _median(separate, "atropos/async/gateway_paused_s")
    print(f"  separate: update served fraction (median) {_median(separate, 'atropos/async/update_served_fraction'):.2f}, "
          f"gateway paused per swap {pause:.3f} s, weight sync {_median(separate, 'atropos/async/weight_sync_s'):.3f} s, "
          f"staleness mean {_median(separate, 'atropos/staleness/mean'):.2f} "
          f"(colocated {_median(by_arm['colocated'], 'atropos/staleness/mean'):.2f})")
    times = phase_times([s for r in by_arm["colocated"] for s in r.steps], warmup=0)  # warm-up already left out
    print(f"timing model (placement/timing_model.py) on the colocated phases: G {times.generation_s:.3f} s, "
          f"U {times.training_s:.3f} s, S {times.sync_s:.3f} s; separate pause P {pause:.3f} s")
    for name, step, speedup, break_even in predictions(times, 8, 4, pause):
        pays = "" if break_even != break_even else f"  (pays when S > {break_even:.3f} s)"
        print(f"  8 devices, {name:55s} {60 / step:8.2f} steps/min  x{speedup:.2f}{pays}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1, help="colocated/separate run pairs (default %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_placement"),
                        help="assets (built once), each run's metrics and logs (default %(default)s)")
    parser.add_argument("--run-timeout-s", type=float, default=1200)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 1:
        raise SystemExit(f"bench: --steps {args.steps} must exceed --warmup {args.warmup} by 2 or more")
    args.out.mkdir(parents=True, exist_ok=True)
    assets_dir = ensure_assets(args.out).resolve()
    print(f"bench: {args.pairs} pair(s) of runs x {args.steps} steps (first {args.warmup} left out), "
          f"config {CONFIG.name}; runs in {args.out}", flush=True)
    runs = []
    for index in range(2 * args.pairs):
        arm = list(ARMS)[index % 2]
        runs.append(run_arm(arm, index, args, assets_dir))
        print(f"  run {index + 1}/{2 * args.pairs} ({arm}): {60 * len(runs[-1].steps) / sum(s['timing_s/step'] for s in runs[-1].steps):.2f} steps/min",
              flush=True)
    report(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
