"""When separate placement pays: steps per minute of both placements from measured phase times.

    python -m recipe.atropos.placement.timing_model METRICS.jsonl [--devices 8] [--split 4]

reads a colocated trajectory-mode run's verl metrics (the file logger's JSONL) and predicts one
step's time on `devices` colocated devices against `split` + (`devices` - `split`) separate ones.

The model, per training step (steps after the first, medians):

- colocated, D devices: ``T_col = G + U + S``
  (G: generation, the trainer's wait for its batch, ``timing_s/gen``; U: training, ``timing_s/step``
  minus G and S; S: putting the servers to sleep and syncing them, ``timing_s/update_weights``);
- separate, A devices training and D - A generating: ``T_sep = max(G * g, U * u) + P``
  where ``u = D / A`` (training on fewer devices, linear scaling), ``g`` = how much longer
  generation takes on ``D - A`` devices than on D (``D / (D - A)`` when generation is throughput
  bound, 1 when it is latency bound: the environments' own time, one long episode, a decode batch
  too small to fill the devices), and P the gateway's pause for each weight swap (the sync alone,
  ``atropos/async/gateway_paused_s`` of a separate run; taken as S when unknown).

Generation and training overlap fully in the separate case only while the bound allows it:
``max_staleness >= 1`` (samples generated during update k train at step k + 1, one version behind).

Assumptions: training time scales linearly with its devices; the colocated run's generation
phase keeps every device busy only to the extent ``g`` says; weight-swap cost P does not grow
with the split; no queueing beyond one batch (run-api holds what the environments make ahead).
Separation pays when ``T_sep < T_col``; with g = u = 2 (everything throughput bound, 4 + 4 of 8)
it pays only when ``P < S`` and G is close to U, and by at most the colocated switch cost; with a
latency-bound generation (g near 1) it pays up to ``(G + U + S) / (max(G, 2U) + P)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PhaseTimes:
    """Median seconds per step of a colocated run (steps after the first)."""

    generation_s: float  # G: the trainer waiting for its batch (environments generating)
    training_s: float  # U: log-probs, advantages, actor update, the rest of the step
    sync_s: float  # S: sleeping the servers and loading the new weights

    @property
    def colocated_step_s(self) -> float:
        return self.generation_s + self.training_s + self.sync_s


def phase_times(steps: list[dict], warmup: int = 1) -> PhaseTimes:
    """Medians over the steps after the first `warmup` (step 1's generation includes every start-up)."""
    later = steps[warmup:] or steps
    gen = [s.get("timing_s/gen", 0.0) for s in later]
    sync = [s.get("timing_s/update_weights", 0.0) for s in later]
    train = [s["timing_s/step"] - g - w for s, g, w in zip(later, gen, sync)]
    return PhaseTimes(statistics.median(gen), statistics.median(train), statistics.median(sync))


def separate_step_s(times: PhaseTimes, devices: int, train_devices: int, generation_scaling: float,
                    swap_pause_s: float | None = None) -> float:
    """``max(G * g, U * D / A) + P`` (the module's docstring)."""
    if not 0 < train_devices < devices:
        raise ValueError(f"--split must be between 1 and --devices - 1 ({devices - 1}), got {train_devices}")
    pause = times.sync_s if swap_pause_s is None else swap_pause_s
    return max(times.generation_s * generation_scaling, times.training_s * devices / train_devices) + pause


def predictions(times: PhaseTimes, devices: int = 8, train_devices: int = 4,
                swap_pause_s: float | None = None) -> list[tuple[str, float, float, float]]:
    """(case, seconds per step, speed-up over colocated, break-even S) for generation from latency to
    throughput bound; break-even S: the colocated sleep + sync time above which separate is faster,
    all else as measured (``T_sep - G - U``)."""
    throughput = devices / (devices - train_devices)
    out = [("colocated", times.colocated_step_s, 1.0, float("nan"))]
    for name, g in (("separate, generation latency bound (g=1)", 1.0),
                    (f"separate, half-way (g={(1 + throughput) / 2:g})", (1 + throughput) / 2),
                    (f"separate, generation throughput bound (g={throughput:g})", throughput)):
        step = separate_step_s(times, devices, train_devices, g, swap_pause_s)
        out.append((name, step, times.colocated_step_s / step, step - times.generation_s - times.training_s))
    return out


def main(argv: list[str] | None = None) -> int:
    from recipe.atropos.demo.run_report import read_steps

    parser = argparse.ArgumentParser(prog="python -m recipe.atropos.placement.timing_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="verl's metrics JSONL of a colocated trajectory-mode run")
    parser.add_argument("--devices", type=int, default=8, help="devices in all (default 8)")
    parser.add_argument("--split", type=int, default=4, help="devices that train when separate (default 4)")
    parser.add_argument("--swap-pause-s", type=float, default=None,
                        help="the gateway's pause per weight swap when separate (default: the colocated sync time)")
    args = parser.parse_args(argv)
    steps = read_steps(args.metrics)
    if len(steps) < 2:
        print(f"{args.metrics}: {len(steps)} step(s); the model needs at least 2", file=sys.stderr)
        return 1
    times = phase_times(steps)
    print(f"measured (median of {len(steps) - 1} steps): generation G {times.generation_s:.3f} s, "
          f"training U {times.training_s:.3f} s, sleep+sync S {times.sync_s:.3f} s")
    for name, step, speedup, break_even in predictions(times, args.devices, args.split, args.swap_pause_s):
        pays = "" if break_even != break_even else f"  (pays when S > {break_even:.3f} s)"
        print(f"  {name:55s} {step:8.3f} s/step  {60 / step:8.2f} steps/min  x{speedup:.2f}{pays}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
