"""The episode core (recipe/atropos/episodes): multi-turn sequences, credit, the group's wire form as
the trainer reads it, the concurrent group loop's failure handling, and the gateway's token-in route.

What a user of a verifiers or OpenEnv entry relies on: sampled tokens trained with mask 1 and their
behaviour log-probs, environment tokens with mask 0, GRPO outcome or process credit exactly, an
episode that fails costs that episode only.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.atropos.episodes.credit import group_advantages
from recipe.atropos.episodes.loop import EpisodeStats, run_episode_groups
from recipe.atropos.episodes.scored_group import scored_data
from recipe.atropos.episodes.spec import EPISODE_KINDS, EpisodeEnvSpec, EpisodeSpecError, load_spec
from recipe.atropos.episodes.transcript import Transcript
from recipe.atropos.episodes.types import Completion, Episode, EpisodeFailed

VOCAB = 50
ids = st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=6)
turn = st.tuples(ids, st.lists(st.floats(-5, 0), min_size=1, max_size=6), st.floats(-1, 1), ids)


def play(prompt: list[int], turns) -> Episode:
    """A transcript: prompt, then per turn a completion (its log-probs), a step reward, environment text."""
    transcript = Transcript(prompt)
    for k, (answer, logprobs, reward, observation) in enumerate(turns):
        logprobs = (logprobs * len(answer))[: len(answer)]
        transcript.add_completion(Completion(tuple(answer), tuple(logprobs)))
        transcript.end_step(reward)
        if k < len(turns) - 1:
            transcript.add_environment(observation)
    return transcript.episode("task")


@settings(max_examples=60, deadline=None)
@given(prompt=ids, turns=st.lists(turn, min_size=1, max_size=4))
def test_a_transcript_keeps_every_token_in_order_with_sampled_tokens_marked(prompt, turns):
    episode = play(prompt, turns)
    expected_ids, expected_mask = list(prompt), [False] * len(prompt)
    for k, (answer, _, _, observation) in enumerate(turns):
        expected_ids += answer
        expected_mask += [True] * len(answer)
        if k < len(turns) - 1:
            expected_ids += observation
            expected_mask += [False] * len(observation)
    assert list(episode.token_ids) == expected_ids and list(episode.sampled_mask) == expected_mask
    assert all(lp == 0.0 for lp, s in zip(episode.logprobs, episode.sampled_mask) if not s)
    assert episode.num_turns == len(turns) and episode.reward == pytest.approx(sum(t[2] for t in turns))
    assert all(episode.sampled_mask[e] and (e + 1 == len(episode.token_ids) or not episode.sampled_mask[e + 1])
               for e in episode.step_ends)


def process_by_hand(episodes: list[Episode]) -> list[list[float]]:
    """DeepSeekMath 4.1.3 written out: normalize all step rewards together; token t sums the steps ending at or after it."""
    rewards = [r for e in episodes for r in e.step_rewards]
    mean, std = np.mean(rewards), (np.std(rewards, ddof=1) if len(rewards) > 1 else 1.0)
    if len(rewards) < 2:
        mean = 0.0
    out = []
    for e in episodes:
        row = []
        for t, sampled in enumerate(e.sampled_mask):
            total = sum((r - mean) / (std + 1e-6) for r, end in zip(e.step_rewards, e.step_ends) if end >= t)
            row.append(total if sampled else 0.0)
        out.append(row)
    return out


@settings(max_examples=60, deadline=None)
@given(group=st.lists(st.tuples(ids, st.lists(turn, min_size=1, max_size=3)), min_size=2, max_size=4))
def test_process_credit_is_grpo_process_supervision_and_outcome_credit_is_grpo(group):
    episodes = [play(prompt, turns) for prompt, turns in group]
    for got, want in zip(group_advantages(episodes, "process"), process_by_hand(episodes)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    rewards = np.array([e.reward for e in episodes])
    outcome = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-6)
    for got, e, a in zip(group_advantages(episodes, "outcome"), episodes, outcome):
        np.testing.assert_allclose(got, np.where(e.sampled_mask, a, 0.0), rtol=1e-4, atol=1e-4)


def test_an_environments_own_advantages_are_kept_and_a_mixed_group_is_refused():
    base = play([1, 2], [([3, 4], [-0.5], 1.0, [5])])
    own = Episode(**{**base.__dict__, "advantages": (9.0, 9.0, 0.25, -0.5)})
    np.testing.assert_array_equal(group_advantages([own, own])[0], [0, 0, 0.25, -0.5])
    with pytest.raises(ValueError, match="1 of 2 episodes"):
        group_advantages([own, base])


@settings(max_examples=40, deadline=None)
@given(group=st.lists(st.tuples(ids, st.lists(turn, min_size=1, max_size=3)), min_size=2, max_size=3))
def test_the_trainer_reads_a_pushed_group_back_exactly(group):
    """scored_data -> the trainer's own converter: response tokens, mask, advantages and log-probs survive."""
    from recipe.atropos.trajectory.scored_data import TrajectoryLimits, scored_groups_to_batch

    episodes = [play(prompt, turns) for prompt, turns in group]
    advantages = group_advantages(episodes, "process")
    payload = scored_data(episodes, advantages, env_name="guess", stats={"episodes": 3.0})
    batch = scored_groups_to_batch([payload], TrajectoryLimits(64, 64, pad_token_id=0, pad_to_limits=False))
    assert list(batch.env_id_B) == ["guess"] * len(episodes)
    for b, (e, a) in enumerate(zip(episodes, advantages)):
        p = e.prompt_length
        n = len(e.token_ids) - p
        assert batch.responses_BT[b, :n].tolist() == list(e.token_ids[p:])
        assert batch.response_mask_BT[b, :n].bool().tolist() == list(e.sampled_mask[p:])
        trained = np.asarray(e.sampled_mask[p:])
        np.testing.assert_allclose(batch.token_level_advantages_BT[b, :n].numpy()[trained], a[p:][trained], atol=1e-6)
        np.testing.assert_allclose(batch.rollout_log_probs_BT[b, :n].numpy()[trained],
                                   np.asarray(e.logprobs[p:])[trained], atol=1e-6)


class RecordingPusher:
    def __init__(self):
        self.payloads = []

    async def push(self, payload):
        self.payloads.append(payload)


def test_failed_episodes_are_counted_logged_and_replaced(caplog):
    """Task k's first try raises, its second hangs past the budget, its third returns nothing; the rest play."""
    tries: dict[str, int] = {}

    async def play_one(task, attempt):
        n = tries[task["task_id"]] = tries.get(task["task_id"], 0) + 1
        if task["task_id"] == "bad" and n == 1:
            raise RuntimeError("the tool crashed")
        if task["task_id"] == "bad" and n == 2:
            await asyncio.sleep(60)
        if task["task_id"] == "bad" and n == 3:
            return None
        if task["task_id"] == "server":
            raise EpisodeFailed("server", "closed with 1012")
        transcript = Transcript([1, 2])
        transcript.add_completion(Completion((3,), (-0.1,)))
        return transcript.episode(task["task_id"], reward=float(attempt))

    spec = EpisodeEnvSpec(type="verifiers", group_size=2, concurrency=2, episode_timeout_s=0.5, max_attempts_factor=2)
    pusher = RecordingPusher()
    tasks = [{"task_id": "ok"}, {"task_id": "bad"}, {"task_id": "server"}, {"task_id": "ok2"}]
    with caplog.at_level(logging.WARNING, logger="verl.recipe.atropos.episodes"):
        stats = asyncio.run(run_episode_groups(spec, "arith", tasks, play_one, pusher))
    # ok and ok2 fill their groups; bad has 1 episode after its 4 tries and server none: both dropped.
    assert [p["group_overrides"]["env_name"] for p in pusher.payloads] == ["arith"] * 2
    assert all(len(p["tokens"]) == 2 for p in pusher.payloads)
    assert stats.total["failures/error"] == 1 and stats.total["failures/timeout"] == 1
    assert stats.total["failures/no_trace"] == 1 and stats.total["failures/server"] == 4
    assert stats.total["failures"] == 7 and stats.total["episodes"] == 5
    assert stats.total["dropped_groups"] == 2 and stats.total["pushed_groups"] == 2
    # Each failure is in the log with its task and what went wrong.
    for text in ("task bad (try 1) failed (error): RuntimeError: the tool crashed", "task bad (try 2) failed (timeout)",
                 "task bad (try 3) failed (no_trace)", "task server (try 4) failed (server): closed with 1012"):
        assert text in caplog.text
    # The counters go to the trainer with the next group: each pushed group's own episodes at least.
    sent = [p["group_overrides"]["episode_stats"] for p in pusher.payloads]
    assert 4 <= sum(s.get("episodes", 0) for s in sent) <= 5
    assert all(s["turns_mean"] == 1 and s["tokens_mean"] == 1 for s in sent)


@settings(max_examples=25, deadline=None)
@given(max_groups=st.integers(1, 6), group_size=st.integers(1, 3), concurrency=st.integers(1, 12),
       push_s=st.sampled_from([0.0, 0.002, 0.01]))
def test_max_groups_is_exact_however_groups_finish_during_a_push(max_groups, group_size, concurrency, push_s):
    """`max_groups` groups pushed, not one more, when several groups finish while one is being pushed
    (a slow run-api): the count is taken before the push."""

    class SlowPusher(RecordingPusher):
        async def push(self, payload):
            await asyncio.sleep(push_s)
            await super().push(payload)

    async def play_one(task, attempt):
        await asyncio.sleep(0.001 * (attempt % 3))
        transcript = Transcript([1, 2])
        transcript.add_completion(Completion((3,), (-0.1,)))
        return transcript.episode(task["task_id"], reward=float(attempt))

    spec = EpisodeEnvSpec(type="verifiers", group_size=group_size, concurrency=concurrency, max_groups=max_groups)
    pusher = SlowPusher()
    tasks = ({"task_id": str(k)} for k in range(10_000))
    stats = asyncio.run(run_episode_groups(spec, "arith", tasks, play_one, pusher))
    assert len(pusher.payloads) == stats.total["pushed_groups"] == max_groups


@settings(max_examples=30, deadline=None)
@given(groups=st.lists(st.lists(st.lists(turn, min_size=1, max_size=4), min_size=1, max_size=4), min_size=1, max_size=3),
       finished_before=st.integers(0, 8))
def test_each_pushed_group_reports_its_own_turns_and_tokens(groups, finished_before):
    """turns_mean and tokens_mean are the pushed group's own, however many episodes of other groups
    finished since the last push; the episode counter is what finished since then."""
    stats = EpisodeStats()
    for group_turns in groups:
        group = [play([1], turns) for turns in group_turns]
        for _ in range(finished_before):
            stats.episode(group[0])
        taken = stats.take(group)
        assert taken["turns_mean"] == pytest.approx(np.mean([len(t) for t in group_turns]))
        assert taken["tokens_mean"] == pytest.approx(np.mean([sum(len(a) for a, *_ in t) for t in group_turns]))
        assert taken.get("episodes", 0) == finished_before


def test_an_entry_with_a_wrong_field_names_it(monkeypatch):
    monkeypatch.setitem(EPISODE_KINDS, "plain", "recipe.atropos.episodes.spec:EpisodeEnvSpec")
    assert load_spec("arith", {"type": "plain", "group_size": 8}).group_size == 8
    with pytest.raises(EpisodeSpecError, match=r"trainer\.atropos\.environments\.arith\.group_size: .*got 0"):
        load_spec("arith", {"type": "plain", "group_size": 0})
    with pytest.raises(EpisodeSpecError, match=r"arith\.grup_size: Extra inputs are not permitted.*known keys"):
        load_spec("arith", {"type": "plain", "grup_size": 4})
    with pytest.raises(EpisodeSpecError, match=r"type 'gym' is not an episode kind"):
        load_spec("arith", {"type": "gym"})


def _trainer_started(api) -> str:
    """Registers a trainer (batches of 4 sequences) with run-api and takes its first (empty) batch, after
    which runners may register; returns run-api's URL."""
    import requests

    requests.post(f"{api.url}/register", json={"wandb_group": "g", "wandb_project": "p", "batch_size": 4,
                                               "max_token_len": 64, "checkpoint_dir": "", "save_checkpoint_interval": 0,
                                               "starting_step": 0, "num_steps": 10}, timeout=30).raise_for_status()
    assert requests.get(f"{api.url}/batch", timeout=30).json()["batch"] is None
    return api.url


@pytest.fixture
def atropos_run_api():
    """atroposlib's own run-api, its trainer started."""
    from recipe.atropos.tests.servers import start_atropos_run_api

    api = start_atropos_run_api()
    try:
        yield _trainer_started(api)
    finally:
        api.stop()


@pytest.fixture
def launcher_run_api():
    """The launcher's run-api (atroposlib's plus GET /envs), its trainer started."""
    import sys

    from recipe.atropos.tests.servers import find_free_loopback_port, start_server_process

    port = find_free_loopback_port()
    api = start_server_process([sys.executable, "-m", "recipe.atropos.launcher.run_api", "--host", "127.0.0.1",
                                "--port", str(port)], port=port, health_path="/")
    try:
        yield _trainer_started(api)
    finally:
        api.stop()


def test_a_runner_registers_with_run_api_once_however_many_groups_push_at_once(atropos_run_api):
    """The real run-api: concurrent first pushes register one environment, and each group is queued."""
    import requests

    from recipe.atropos.episodes.runapi import RunApiPusher

    url = atropos_run_api
    episode = play([1, 2], [([3, 4], [-0.5], 1.0, [5])])
    payload = scored_data([episode, episode], group_advantages([episode, episode]), env_name="arith")

    def status_env(env_id: int) -> int:
        return requests.get(f"{url}/status-env", json={"env_id": env_id}, timeout=30).status_code

    async def push_four():
        pusher = RunApiPusher(url, name="arith", group_size=2, max_token_length=64)
        await asyncio.gather(*(pusher.push(payload) for _ in range(4)))
        # run-api knows env 0 only (a second registration would be env 1; run-api fails on an unknown id).
        assert [await asyncio.to_thread(status_env, i) for i in (0, 1)] == [200, 500]
        await pusher.close()
        return pusher

    pusher = asyncio.run(push_four())
    assert pusher.env_id == 0 and pusher.pushed_groups == 4
    batch = requests.get(f"{url}/batch", timeout=30).json()["batch"]
    assert len(batch) == 2 and all(g["group_overrides"]["env_name"] == "arith" for g in batch)


def test_a_runner_waits_for_the_trainer_and_leaves_no_registration_behind(launcher_run_api):
    """The launcher's run-api (atroposlib's plus GET /envs): with max_batches_offpolicy=1 a runner holds
    its next group until the trainer takes a batch; a runner restarted under the same name disconnects
    its earlier registration (whose min_batch_allocation would hold every batch back: run-api forms none
    while a connected environment with a minimum has nothing queued); closing leaves run-api."""
    import requests

    from recipe.atropos.episodes.runapi import RunApiPusher

    url = launcher_run_api

    def envs() -> dict[int, bool]:
        return {e["env_id"]: e["connected"] for e in requests.get(f"{url}/envs", timeout=30).json()["envs"]}

    def batch() -> list | None:
        return requests.get(f"{url}/batch", timeout=30).json()["batch"]

    episode = play([1, 2], [([3, 4], [-0.5], 1.0, [5])])
    payload = scored_data([episode, episode], group_advantages([episode, episode]), env_name="arith")

    def pusher() -> RunApiPusher:
        return RunApiPusher(url, name="arith", group_size=2, max_token_length=64, min_batch_allocation=0.5,
                            max_batches_offpolicy=1, poll_s=0.05)

    async def bounded_then_restarted():
        first = pusher()
        await first.push(payload)  # half a batch queued: room for more
        third = asyncio.ensure_future(first.push(payload))  # a whole batch queued: held after its push
        await asyncio.sleep(1.0)
        assert not third.done() and first.pushed_groups == 2
        assert len(await asyncio.to_thread(batch)) == 2  # the trainer takes it: the runner goes on
        await asyncio.wait_for(third, 10)
        # The runner is killed (never closed) and restarted: the new life disconnects the old, whose
        # minimum would otherwise hold back the batch that the new one's groups make.
        second = pusher()
        second.max_batches_offpolicy = 0
        await second.push(payload)
        await second.push(payload)
        assert (first.env_id, second.env_id) == (0, 1) and await asyncio.to_thread(envs) == {0: False, 1: True}
        assert len(await asyncio.to_thread(batch)) == 2
        await second.close()
        assert await asyncio.to_thread(envs) == {0: False, 1: False}
        await first.session.close()

    asyncio.run(bounded_then_restarted())


def test_a_runner_short_of_its_minimum_is_not_held_by_the_others_run_ahead(launcher_run_api):
    """run-api forms no batch while a connected environment with a `min_batch_allocation` has nothing
    queued. A runner held by the run-ahead bound after its groups were all trained, while the others'
    groups fill run-api, would hold the trainer, and the trainer it (a CI run stopped this way: 19 groups
    queued, none from the verifiers entry). It goes on while it holds fewer than its share."""
    import requests

    from recipe.atropos.episodes.runapi import RunApiPusher
    from recipe.atropos.trajectory.diagnostics import run_api_report

    url = launcher_run_api

    def batch_from() -> list[str] | None:
        batch = requests.get(f"{url}/batch", timeout=30).json()["batch"]
        return None if batch is None else sorted(g["group_overrides"]["env_name"] for g in batch)

    episode = play([1, 2], [([3, 4], [-0.5], 1.0, [5])])

    def payload(name: str) -> dict:
        return scored_data([episode, episode], group_advantages([episode, episode]), env_name=name)

    async def until(condition) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def two_batches():
        # Groups of 2 in batches of 4: each entry's minimum is one group a batch.
        busy = RunApiPusher(url, name="busy", group_size=2, max_token_length=64, min_batch_allocation=0.5)
        late = RunApiPusher(url, name="late", group_size=2, max_token_length=64, min_batch_allocation=0.5,
                            max_batches_offpolicy=1, poll_s=0.05)
        for _ in range(3):
            await busy.push(payload("busy"))  # unbounded: its groups in flight all land

        async def queued_then_held(pushed: int) -> asyncio.Future:
            held = asyncio.ensure_future(late.push(payload("late")))
            await asyncio.wait_for(until(lambda: late.pushed_groups == pushed), 10)  # queued in run-api
            await asyncio.sleep(0.5)
            assert not held.done()
            return held

        held = await queued_then_held(1)  # 4 groups queued, 1 of them its own
        assert await asyncio.to_thread(batch_from) == ["busy", "late"]
        # 2 groups queued, a whole batch, none of them late's: without its next group no batch forms,
        # and the trainer's report says which entry it waits for.
        assert await asyncio.to_thread(batch_from) is None
        report = await asyncio.to_thread(run_api_report, url)
        assert f"waiting for a group from env_id {late.env_id} (late): run-api forms no batch" in report
        await asyncio.wait_for(held, 10)
        held = await queued_then_held(2)  # 3 groups queued, 1 of them its own
        assert await asyncio.to_thread(batch_from) == ["busy", "late"]
        await asyncio.wait_for(held, 10)  # 1 group queued: room
        await busy.close()
        await late.close()

    asyncio.run(two_batches())


def test_the_trainer_sums_a_runners_counters_and_averages_its_means_per_entry():
    import json

    from recipe.atropos.trajectory.metrics import episode_metrics

    first = {"episodes": 4, "failures": 1, "failures/timeout": 1, "parse_failures": 2, "turns_mean": 3.0,
             "tokens_mean": 10.0, "group_reward_mean": 0.5}
    second = {"episodes": 4, "parse_failures": 1, "turns_mean": 1.0, "tokens_mean": 20.0, "group_reward_mean": -0.5}
    rows = ["guess", "guess", "guess", "guess", 0, 0]
    stats = [json.dumps(first), "", json.dumps(second), "", "", ""]
    metrics = episode_metrics(rows, stats)
    assert metrics == {
        "atropos/env/guess/episodes": 8.0, "atropos/env/guess/failures": 1.0, "atropos/env/guess/failures/timeout": 1.0,
        "atropos/env/guess/dropped_groups": 0.0, "atropos/env/guess/parse_failures": 3.0,
        "atropos/env/guess/turns_per_episode": 2.0, "atropos/env/guess/tokens_per_episode": 15.0,
        "atropos/env/guess/reward": 0.0,
    }
