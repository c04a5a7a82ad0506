"""The parts of separate rollout placement, without Ray: the gloo weight sync (two real gloo ranks),
the gateway's busy time, the staleness distribution, the samples generated during updates, and what
the configuration refuses."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from recipe.atropos.config import AtroposTrainerConfig
from recipe.atropos.cpu import gloo_checkpoint_engine as gloo
from recipe.atropos.placement.separate_trainer import check_rollout_pool_config, generated_during_updates
from recipe.atropos.trajectory.activity import ServingActivity
from recipe.atropos.trajectory.gate import Backends
from recipe.atropos.trajectory.staleness import staleness_distribution


@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setattr(gloo, "_node_address", lambda: "127.0.0.1")


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 8, generator=generator),  # 1600 bytes: split over buckets of 512
        "norm.weight": torch.randn(8, generator=generator),
        "head.bias": torch.randn(3, generator=generator).to(torch.float64),
        "step": torch.tensor([7], dtype=torch.int64),
    }


def test_gloo_engine_sends_every_weight_exactly_through_small_buckets(loopback):
    """Actor rank 0 sends, a second actor rank only walks its generator, two rollout workers receive."""
    sent = _weights()
    sender, other_actor = gloo.GlooCheckpointEngine(512, is_master=True), gloo.GlooCheckpointEngine(512)
    receivers = [gloo.GlooCheckpointEngine(512) for _ in range(2)]
    metadata = [sender.prepare(), other_actor.prepare()] + [r.prepare() for r in receivers]
    actor_kwargs, rollout_kwargs = gloo.GlooCheckpointEngine.build_topology(2, 2, metadata)
    assert actor_kwargs["rank"] == [0, -1] and rollout_kwargs["rank"] == [1, 2]
    engines = [sender, other_actor, *receivers]
    kwargs = [{k: v[i] for k, v in actor_kwargs.items()} for i in range(2)]
    kwargs += [{k: v[i] for k, v in rollout_kwargs.items()} for i in range(2)]
    received: list[dict[str, torch.Tensor]] = [{}, {}]
    walked = []

    def run(i: int) -> None:
        engines[i].init_process_group(**kwargs[i])  # each gloo rank joins from its own thread

        async def act():
            if i < 2:
                items = iter(sent.items()) if i == 0 else _counting(sent, walked)
                await engines[i].send_weights(items)
            else:
                async for name, tensor in engines[i].receive_weights():
                    received[i - 2][name] = tensor.clone()
        asyncio.run(act())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for engine in engines:
        engine.finalize()
    assert walked == list(sent)  # the other rank's part of each gather was produced
    for got in received:
        assert list(got) == list(sent)
        for name, tensor in sent.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def _counting(weights, walked):
    for name, tensor in weights.items():
        walked.append(name)
        yield name, tensor


def test_gloo_engine_refuses_a_topology_without_a_store():
    with pytest.raises(RuntimeError, match="actor rank 0 opened no store"):
        gloo.GlooCheckpointEngine.build_topology(1, 1, [None, None])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 10)), max_size=8), st.floats(0, 100), st.floats(0, 50))
def test_busy_seconds_are_the_overlap_of_the_busy_stretches_with_the_interval(stretches, start, length):
    """Busy stretches (start, duration), made disjoint by sorting and clipping, against a brute-force
    sum of overlaps."""
    activity, last_end, disjoint = ServingActivity(), 0.0, []
    for a, duration in sorted(stretches):
        a = max(a, last_end)
        activity.busy(now=a)
        activity.idle(now=a + duration)
        disjoint.append((a, a + duration))
        last_end = a + duration
    end = start + length
    expected = sum(max(0.0, min(end, b) - max(start, a)) for a, b in disjoint)
    assert activity.busy_seconds(start, end) == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= activity.busy_fraction(start, end) <= 1.0 + 1e-9


def test_a_stretch_still_open_counts_up_to_now():
    activity = ServingActivity()
    activity.busy(now=10.0)
    activity.busy(now=11.0)  # a second request while one is in flight: the same stretch
    assert activity.busy_seconds(0.0, 20.0, now=15.0) == pytest.approx(5.0)
    activity.idle(now=16.0)
    assert activity.busy_fraction(12.0, 20.0) == pytest.approx(0.5)


def test_a_restarted_server_takes_its_predecessors_place():
    backends = Backends(["http://a:1", "http://b:2/"])
    backends.replace("http://b:2", "http://b:3")
    assert backends.urls == ["http://a:1", "http://b:3"] and backends.in_flight["http://b:3"] == 0


def test_staleness_distribution_has_a_key_per_version_up_to_the_bound():
    assert staleness_distribution([0, 0, 1, 2], max_staleness=3) == {
        "atropos/staleness/fraction_0": 0.5, "atropos/staleness/fraction_1": 0.25,
        "atropos/staleness/fraction_2": 0.25, "atropos/staleness/fraction_3": 0.0}
    assert list(staleness_distribution([1], None)) == ["atropos/staleness/fraction_0", "atropos/staleness/fraction_1"]


def test_samples_generated_during_updates_are_counted_against_the_update_windows():
    windows = [(10.0, 12.0), (20.0, 21.0)]
    times = [11.0, 12.0, 15.0, 20.5, float("nan")]
    assert generated_during_updates(times, windows) == {"atropos/async/generated_during_update_fraction": 0.75}
    assert generated_during_updates(None, windows) == {}


def test_separate_placement_needs_trajectory_mode():
    with pytest.raises(ValueError, match="rollout_placement=separate needs trainer.atropos.mode=trajectory"):
        AtroposTrainerConfig.parse({"mode": "evaluate", "rollout_placement": "separate"})
    with pytest.raises(ValueError, match="rollout_placement must be one of"):
        AtroposTrainerConfig.parse({"mode": "trajectory", "rollout_placement": "elsewhere"})


@pytest.mark.parametrize(("rollout", "message"), [
    ({"nnodes": 0, "n_gpus_per_node": 1, "name": "hf", "checkpoint_engine": {"backend": "gloo"}}, "rollout.nnodes"),
    ({"nnodes": 1, "n_gpus_per_node": 1, "name": "hf", "checkpoint_engine": {"backend": "naive"}}, "backend"),
    ({"nnodes": 1, "n_gpus_per_node": 1, "name": "vllm", "free_cache_engine": True,
      "checkpoint_engine": {"backend": "nccl"}}, "free_cache_engine=false"),
])
def test_the_rollout_pool_settings_are_checked(rollout, message):
    with pytest.raises(ValueError, match=message):
        check_rollout_pool_config(OmegaConf.create({"actor_rollout_ref": {"rollout": rollout}}))
