"""A finished verifiers episode as the episode core's `Episode` (what the runner trains), or why not.

verifiers' training client fills each trace's message graph with the exact token ids the policy
sampled and the ones the renderer added around them (verifiers/v1/trace.py `Branch`): per root-to-leaf
branch, `token_ids`, `sampled_mask` (True on the sampled tokens), `logprobs` (the behaviour log-prob
of each sampled token, 0.0 elsewhere) and `advantages` (per-token credit, None unless something
assigned it). One trainable branch of one trainable trace is one training sample:

    token_ids    = branch.token_ids        (never re-tokenized)
    sampled_mask = branch.sampled_mask     (environment text between turns: False)
    logprobs     = branch.logprobs
    reward       = trace.reward            (the weighted sum of the task's @vf.reward results)
    advantages   = branch.advantages       (None: GRPO over the group's rewards)
    num_turns    = trace.num_turns

A group holds `group_size` samples, so an episode must give exactly one; one with several trainable
branches (two trainable agents, a compaction) is refused, naming the fix. An episode that failed
(verifiers records errors on the episode and its traces instead of raising) or left nothing sampled
raises `EpisodeFailed`, which the core counts by kind: `timeout` (a verifiers deadline), `server` (a
policy call got no answer or a 5xx), `no_trace`, `error` (the rest: the environment's own code).
"""

from __future__ import annotations

from typing import Any

from recipe.atropos.episodes.types import Episode, EpisodeFailed

__all__ = ["to_episode"]


def _error_text(errors: list[Any]) -> str:
    last = errors[-1]
    return f"{last.type}: {last.message}"


def _kind(error: Any) -> str:
    """`server` for a policy call that failed on the way (no answer, or a 5xx: the gateway or the
    inference server), `error` for the rest (the environment's own code, a 4xx)."""
    status = getattr(error, "status_code", None)
    return "server" if error.type == "ProviderError" and (status is None or status >= 500) else "error"


def _failure(vf_episode: Any) -> EpisodeFailed | None:
    """Why a finished verifiers episode cannot train, or None when it can."""
    traces = list(vf_episode.traces)
    if vf_episode.is_timeout or any(t.is_timeout and not t.ok for t in traces):
        where = vf_episode.errors or [e for t in traces for e in t.errors]
        return EpisodeFailed("timeout", _error_text(where) if where else "a verifiers stage deadline expired")
    if vf_episode.errors:
        return EpisodeFailed("error", _error_text(vf_episode.errors))
    for trace in traces:
        if not trace.ok:
            if not trace.errors:
                return EpisodeFailed("error", f"agent {trace.agent.name!r}: the trace did not complete")
            return EpisodeFailed(_kind(trace.errors[-1]), f"agent {trace.agent.name!r}: {_error_text(trace.errors)}")
    if not vf_episode.ok:
        return EpisodeFailed("error", "verifiers marked the episode not ok without an error")
    return None


def to_episode(vf_episode: Any, task_id: str) -> Episode:
    """The one training sample of `vf_episode`; EpisodeFailed when there is none to train."""
    failure = _failure(vf_episode)
    if failure is not None:
        raise failure
    samples = [(trace, branch) for trace in vf_episode.traces if trace.agent.trainable
               for branch in trace.branches if branch.trainable]
    if not samples:
        raise EpisodeFailed("no_trace", "the episode has no trainable trace with tokens (did the policy answer?)")
    if len(samples) > 1:
        agents = sorted({trace.agent.name for trace, _ in samples})
        raise EpisodeFailed("error", (
            f"the episode has {len(samples)} trainable branches (agents {agents}); a group trains one sample per "
            "episode: mark the other agents untrainable in the Env's setup() (agents.<role>.trainable = False)"))
    trace, branch = samples[0]
    mask = tuple(bool(m) for m in branch.sampled_mask)
    if not any(mask):
        raise EpisodeFailed("no_trace", "the trace holds no token sampled by the policy")
    if mask[0]:
        # verifiers' graph always starts with the rendered prompt; a sampled first token means a harness
        # sent no prompt at all, which the core cannot train (the prompt is the leading unsampled run).
        raise EpisodeFailed("no_trace", "the trace starts with a sampled token: no prompt")
    advantages = branch.advantages
    return Episode(
        task_id=task_id,
        token_ids=tuple(int(t) for t in branch.token_ids),
        sampled_mask=mask,
        logprobs=tuple(float(x) for x in branch.logprobs),
        reward=float(trace.reward),
        advantages=None if advantages is None else tuple(float(a) for a in advantages),
        num_turns=int(trace.num_turns),
    )
