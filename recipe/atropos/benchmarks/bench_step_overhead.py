"""What the recipe costs per training step against plain verl GRPO, on the same CPU configuration:

    loopback-only .venv/bin/python -m recipe.atropos.benchmarks.bench_step_overhead
    make install-vllm
    loopback-only .venv-vllm/bin/python -m recipe.atropos.benchmarks.bench_step_overhead --rollout vllm

Two arms, both `python -m verl.trainer.main_ppo` with the demo's config (config/gsm8k_grpo_cpu.yaml:
the tiny model, batch 8 x n 8, 96 + 32 tokens, the same data seed, hence the same prompts each step):

- verl: `trainer_cls=null`, so verl's own RayPPOTrainer (legacy TaskRunner) with verl's GSM8K
  reward, and no recipe code: only the CPU platform plugin and the `hf` rollout (recipe/atropos/cpu),
  which verl needs to run on a CPU at all, and which the recipe arm uses just the same;
- recipe: RayGRPOAtroposTrainer in evaluate mode (the config's `trainer_cls`) with the GSM8K
  environment service (token-level advantages), started once by this script, as the launcher would.

Both arms run with learning rate 0 (the update's work is the same; the weights, and with them the
responses each arm generates, stay the same distribution). The arms alternate, one whole run each, in pairs (verl then recipe, recipe then verl, ...), so that
both see the same machine load and a load that drifts favours neither. verl's per-step timings (its file logger) are read back; each run's first
`--warmup` steps (worker start-up, first compilations) are left out. For each phase, the median over
all kept steps of each arm, and the ratio recipe / verl (goal: total <= 1.02x):

    generation    timing_s/gen            (rollout; verl's reward is scored in the agent loop)
    old log-prob  timing_s/old_log_prob   (recipe: the request to the service is sent here, on a thread)
    advantage     timing_s/adv            (verl's GRPO estimator; identical code in both arms)
    update        timing_s/update_actor   (recipe: waits for the service's answer, writes the overrides)
    total         timing_s/step

The spread is shown as the ratio of each pair of runs. Timing is printed, never asserted; what is
checked is that the recipe's steps used the service's advantages (no fallback) and that the verl
arm ran no recipe code (no `atropos/` metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from omegaconf import OmegaConf

from recipe.atropos.demo.cli import CONFIG, ROLLOUTS, ensure_assets
from recipe.atropos.demo.run_report import read_steps
from recipe.atropos.server_process import REPO_ROOT, find_free_loopback_port, start_server_process

PHASES = {
    "generation": "timing_s/gen",
    "old log-prob": "timing_s/old_log_prob",
    "advantage": "timing_s/adv",
    "update": "timing_s/update_actor",
    "total": "timing_s/step",
}
ARMS = ("verl", "recipe")
GOAL_TOTAL_RATIO = 1.02


def environment_argv(host: str, port: int) -> list[str]:
    """The demo config's environment service command (its `launcher.environment.command`)."""
    command = OmegaConf.to_container(OmegaConf.load(CONFIG).launcher.environment.command)
    argv = [part.format(host=host, port=port) for part in command]
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def recipe_only_path(out: Path) -> Path:
    """A folder holding only a link to this repo's `recipe` package: on the verl arm's PYTHONPATH instead
    of the repo root, whose `verl/` overlay (GRPO with overrides, main_ppo's trainer_cls) is recipe code."""
    folder = (out / "plain_verl_path").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "recipe"
    if not link.is_symlink():
        link.symlink_to(REPO_ROOT / "recipe", target_is_directory=True)
    return folder


def arm_places(kind: str, out: Path) -> tuple[str, Path]:
    """(PYTHONPATH, working folder) of a trainer: the recipe's from the repo root, verl's from `out` with
    the repo root off its path (`python -m` puts the working folder first on sys.path, Ray's workers too)."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and Path(p).resolve() != REPO_ROOT.resolve()]
    if kind == "recipe":
        return os.pathsep.join([str(REPO_ROOT), *inherited]), REPO_ROOT
    return os.pathsep.join([str(recipe_only_path(out)), *inherited]), out.resolve()


def trainer_env(kind: str, out: Path, assets_dir: Path, metrics_path: Path) -> dict[str, str]:
    """What the launcher gives a CPU trainer (the CPU platform, loopback rendezvous), for both arms."""
    return {
        **os.environ,
        "PYTHONPATH": arm_places(kind, out)[0],
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VERL_PLATFORM": "cpu",
        "VERL_USE_EXTERNAL_MODULES": "recipe.atropos.cpu,recipe.atropos.rendezvous",
        "DIST_INIT_METHOD": "atropos-env://",
        "VERL_FILE_LOGGER_PATH": str(metrics_path),
        "VERL_CPU_MODEL_PATH": str(assets_dir / "model"),
        "VERL_CPU_TRAIN_FILES": str(assets_dir / "data/train.parquet"),
        "VERL_CPU_VAL_FILES": str(assets_dir / "data/test.parquet"),
        "RAY_DEDUP_LOGS": "1",
    }


def check_plain_verl(out: Path, assets_dir: Path) -> str:
    """Where the verl arm's trainer and GRPO come from: the installed release, never the overlay."""
    probe = ("import verl.trainer.main_ppo as m, verl.trainer.ppo.core_algos as c, verl; "
             "print(m.__file__, c.__file__, sep='\\n')")
    kind_env = trainer_env("verl", out, assets_dir, out / "probe.jsonl")
    files = subprocess.run([sys.executable, "-c", probe], cwd=arm_places("verl", out)[1], env=kind_env,
                           capture_output=True, text=True, check=True).stdout.split()
    overlaid = [f for f in files if Path(f).resolve().is_relative_to((REPO_ROOT / "verl").resolve())]
    if overlaid:
        raise SystemExit(f"bench: the verl arm would run this repo's verl overlay ({overlaid}): it must be plain verl")
    return str(Path(files[0]).parents[2])


def trainer_argv(arm: str, steps: int, rollout: str, api_url: str, extra: list[str]) -> list[str]:
    arm_overrides = ["trainer_cls=null"] if arm == "verl" else [f"trainer.atropos.api_url={api_url}"]
    return [
        sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG.parent), "--config-name", CONFIG.stem,
        # Training steps only: no validation, no checkpoints. Learning rate 0: both arms keep sampling
        # from the same weights, so their responses (and every phase's work) stay alike; learning, each
        # arm's policy drifts its own way (the arms train on different advantages) and with it the
        # response lengths: measured so, hf gave 1.13x and vLLM 0.80x, both lengths, not overhead.
        f"trainer.total_training_steps={steps}", "actor_rollout_ref.actor.optim.lr=0", "trainer.val_before_train=false", "trainer.test_freq=-1",
        "trainer.save_freq=-1", "+ray_kwargs.ray_init.include_dashboard=false",
        # A Ray of its own (not the last cluster `ray start` recorded in /tmp/ray).
        "++ray_kwargs.ray_init.address=local", *ROLLOUTS[rollout], *arm_overrides, *extra,
    ]


@dataclasses.dataclass
class Run:
    arm: str
    steps: list[dict]  # verl's metrics of the kept steps
    cpu_s: list[float]  # CPU seconds of each kept step: the trainer's processes and the service's
    service_cpu_s: list[float]  # the service's part of cpu_s
    wall_s: float


def tree_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes and all their children have used so far (Ray's
    workers are children of the trainer, whose `ray.init()` starts the local cluster)."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                total += sum(process.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
    return total


def kill_session(trainer: subprocess.Popen) -> None:
    """SIGKILL the trainer's session (started with a session of its own: the trainer and its Ray)."""
    try:
        os.killpg(trainer.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    trainer.wait()


def follow(trainer: subprocess.Popen, metrics_path: Path, service_pid: int, deadline: float) -> dict[int, tuple]:
    """Wait for the trainer; {step: (the trainer's, the service's) CPU seconds so far when verl logged it}."""
    cpu_at_step: dict[int, tuple] = {}
    offset = 0
    while trainer.poll() is None:
        if time.monotonic() > deadline:
            kill_session(trainer)
            break
        time.sleep(0.2)
        if not metrics_path.exists() or metrics_path.stat().st_size == offset:
            continue
        with open(metrics_path, "rb") as f:
            f.seek(offset)
            complete, _, _ = f.read().rpartition(b"\n")
        if not complete:
            continue
        offset += len(complete) + 1
        cpu = (tree_cpu_s([trainer.pid]), tree_cpu_s([service_pid]))
        for line in complete.split(b"\n"):
            record = json.loads(line)
            if "timing_s/step" in record["data"]:
                cpu_at_step[record["step"]] = cpu
    return cpu_at_step


def run_trainer(arm: str, index: int, args: argparse.Namespace, assets_dir: Path, service) -> Run:
    """One whole training run of `arm` (with --aa, verl's trainer in both arms); its steps after the warm-up."""
    trainer_kind = "verl" if args.aa else arm
    metrics_path = (args.out / f"run{index:02d}_{arm}.jsonl").resolve()
    log_path = metrics_path.with_suffix(".log")
    metrics_path.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        trainer = subprocess.Popen(
            trainer_argv(trainer_kind, args.steps, args.rollout, service.url, args.overrides),
            cwd=arm_places(trainer_kind, args.out)[1], env=trainer_env(trainer_kind, args.out, assets_dir, metrics_path),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            cpu_at_step = follow(trainer, metrics_path, service.process.pid, time.monotonic() + args.run_timeout_s)
        except BaseException:
            kill_session(trainer)
            raise
    wall_s = time.perf_counter() - start
    steps = read_steps(metrics_path) if metrics_path.exists() else []
    if trainer.returncode != 0 or len(steps) != args.steps:
        raise SystemExit(f"bench: the {arm} run exited {trainer.returncode} after {len(steps)}/{args.steps} steps; "
                         f"see {log_path}")
    check_arm(trainer_kind, steps, log_path)
    kept = steps[args.warmup:]
    # A step's CPU: from verl logging the step before to logging this one (the sampling lags by <= 0.2 s).
    spans = [(cpu_at_step[s["step"] - 1], cpu_at_step[s["step"]]) for s in kept
             if s["step"] in cpu_at_step and s["step"] - 1 in cpu_at_step]
    trainer_cpu = [end[0] - begin[0] for begin, end in spans]
    service_cpu = [end[1] - begin[1] for begin, end in spans]
    return Run(arm, kept, [t + s for t, s in zip(trainer_cpu, service_cpu)], service_cpu, wall_s)


def check_arm(arm: str, steps: list[dict], log_path: Path) -> None:
    """The recipe arm trained on the service's advantages; the verl arm ran no recipe code."""
    if arm == "recipe":
        fell_back = [s["step"] for s in steps if s.get("atropos/fallback", 1.0) != 0.0]
        if fell_back:
            raise SystemExit(f"bench: recipe steps {fell_back} fell back to verl's GRPO (the service did not answer "
                             f"in time?): they would not measure the recipe; see {log_path}")
    elif any(key.startswith("atropos/") for s in steps for key in s):
        raise SystemExit(f"bench: the verl run logged atropos/ metrics, so it ran recipe code; see {log_path}")


def phase_medians(runs: list[Run]) -> dict[str, float]:
    return {phase: statistics.median(s[key] for r in runs for s in r.steps) for phase, key in PHASES.items()}


def median_of(runs: list[Run], arm: str, values) -> float:
    """The median over all kept steps of `arm`'s runs of `values(run)` (a list per run)."""
    return statistics.median(v for r in runs if r.arm == arm for v in values(r))


def report(runs: list[Run], rollout: str, aa: bool) -> None:
    """Per phase: each arm's median step time and the ratio; each pair's total ratio (the spread);
    then what the recipe adds, measured directly: its hooks' time and the CPU per step."""
    medians = {arm: phase_medians([r for r in runs if r.arm == arm]) for arm in ARMS}
    kept = {arm: sum(len(r.steps) for r in runs if r.arm == arm) for arm in ARMS}
    # A/A: the second arm is verl's trainer too (verl'), so the ratios show the machine's noise alone.
    second = "verl'" if aa else "recipe"
    what = "A/A, verl' = verl's trainer again: " if aa else ""
    print(f"\n{rollout} rollout: {what}median seconds per step (verl's timing_s/*) over {kept['verl']} verl and "
          f"{kept['recipe']} {second} steps")
    print(f"  {'phase':<13} {'verl':>8} {second:>8} {second + '/verl':>12}")
    for phase in PHASES:
        verl_s, recipe_s = medians["verl"][phase], medians["recipe"][phase]
        print(f"  {phase:<13} {verl_s:8.3f} {recipe_s:8.3f} {recipe_s / verl_s:11.3f}x")
    pairs = [sorted(runs[i:i + 2], key=lambda r: ARMS.index(r.arm)) for i in range(0, len(runs) - 1, 2)]
    pair_ratios = [phase_medians([recipe])["total"] / phase_medians([verl])["total"] for verl, recipe in pairs]
    total_ratio = medians["recipe"]["total"] / medians["verl"]["total"]
    goal = "" if aa else f"; goal <= {GOAL_TOTAL_RATIO}x: {'met' if total_ratio <= GOAL_TOTAL_RATIO else 'not met'}"
    print(f"  total per pair of runs: {', '.join(f'{x:.3f}x' for x in pair_ratios)}{goal}")
    cpu = {arm: median_of(runs, arm, lambda r: r.cpu_s) for arm in ARMS}
    print(f"  CPU seconds per step (the trainer, its Ray workers, the service): verl {cpu['verl']:.3f}, {second} "
          f"{cpu['recipe']:.3f} = {cpu['recipe'] / cpu['verl']:.3f}x; the environment service's part: verl "
          f"{median_of(runs, 'verl', lambda r: r.service_cpu_s):.3f} (idle), {second} "
          f"{median_of(runs, 'recipe', lambda r: r.service_cpu_s):.3f}")
    if aa:
        return

    def recipe_metric(name: str) -> float:
        return median_of(runs, "recipe", lambda r: [s[name] for s in r.steps])

    submit_s, apply_s = recipe_metric("atropos/timing_s/submit"), recipe_metric("atropos/timing_s/apply")
    wait_s = recipe_metric("atropos/wait_s")
    print(f"  the recipe's hooks on the trainer's thread (medians per step): {1000 * submit_s:.1f} ms sending the "
          f"batch (in old log-prob) + {1000 * apply_s:.1f} ms applying the answer (in update; waiting for it "
          f"{1000 * wait_s:.1f} ms) = {(submit_s + apply_s) / medians['verl']['total']:.2%} of verl's step", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout", choices=sorted(ROLLOUTS), default="hf",
                        help="verl's rollout in both arms (vllm: from .venv-vllm, `make install-vllm`)")
    parser.add_argument("--pairs", type=int, default=3, help="verl/recipe run pairs (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="first steps of each run left out (default %(default)s): step 1 includes start-up")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_step_overhead"),
                        help="assets (built once), each run's metrics and log (default %(default)s)")
    parser.add_argument("--run-timeout-s", type=float, default=900)
    parser.add_argument("--aa", action="store_true",
                        help="A/A: verl's trainer in both arms, to see what ratios the machine's noise alone gives")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms (e.g. data.train_batch_size=16)")
    args = parser.parse_args(argv)
    if args.rollout == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise SystemExit("bench: --rollout vllm needs vLLM's CPU build: `make install-vllm`, then run this "
                             "with .venv-vllm/bin/python") from None
    if args.steps <= args.warmup:
        raise SystemExit(f"bench: --steps {args.steps} must exceed --warmup {args.warmup}")

    args.out.mkdir(parents=True, exist_ok=True)
    assets_dir = ensure_assets(args.out).resolve()
    verl_from = check_plain_verl(args.out, assets_dir)
    port = find_free_loopback_port()
    service = start_server_process(environment_argv("127.0.0.1", port), port=port, startup_timeout_s=120)
    print(f"bench: {args.rollout} rollout, {args.pairs} pairs of runs x {args.steps} steps (first {args.warmup} left "
          f"out); environment service {service.url}; runs in {args.out}; the verl arm's verl: {verl_from}", flush=True)
    runs: list[Run] = []
    try:
        # Pairs in turn verl-recipe and recipe-verl (ABBA): a load that drifts during a pair favours neither.
        order = [arm for pair in range(args.pairs) for arm in (ARMS if pair % 2 == 0 else ARMS[::-1])]
        for index, arm in enumerate(order):
            run = run_trainer(arm, index, args, assets_dir, service)
            runs.append(run)
            total = statistics.median(s["timing_s/step"] for s in run.steps)
            cpu = statistics.median(run.cpu_s) if run.cpu_s else float("nan")
            label = "verl'" if args.aa and arm == "recipe" else arm
            print(f"  run {index + 1}/{2 * args.pairs}: {label:<6} {run.wall_s:5.0f} s, median step {total:.3f} s, "
                  f"{cpu:.3f} CPU s", flush=True)
    finally:
        service.stop()
    report(runs, args.rollout, args.aa)
    return 0


if __name__ == "__main__":
    sys.exit(main())
