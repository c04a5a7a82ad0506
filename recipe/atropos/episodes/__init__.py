"""The episode core: what every episode-playing environment kind shares.

Atropos environments, verifiers environments (recipe/atropos/verifiers) and OpenEnv servers
(recipe/atropos/openenv) differ only in how one episode is played; this package does the rest of
trajectory mode's environment side:

- types.py: `Completion` (one policy answer), `Episode` (one finished episode: exact tokens, which
  of them the policy sampled, their behaviour log-probs, rewards per step, optional per-token credit),
  `EpisodeFailed`.
- transcript.py: `Transcript`, the builder of a multi-turn token sequence (environment tokens mask 0,
  sampled tokens mask 1, nothing ever re-tokenized).
- policy.py: `TokenPolicyClient`, token ids in, token ids and log-probs out, through the policy
  gateway's `/inference/v1/generate` (recorded there with the weights version that answered).
- credit.py: `group_advantages`, a group's per-token advantages (GRPO outcome, GRPO process
  supervision, or the environment's own).
- scored_group.py: `scored_data`, a group as atroposlib's ScoredData (what run-api queues).
- runapi.py: `RunApiPusher`, registration with run-api and pushes, with retries.
- loop.py: `run_episode_groups`, groups of episodes played concurrently, failures counted and
  replaced, each full group credited and pushed; `EpisodeStats`.
- spec.py: `EpisodeEnvSpec`, the settings every kind's entry of `trainer.atropos.environments` has.
- cli.py: the command line every runner process shares (the launcher starts
  `python -m recipe.atropos.<type> --name ... --spec-json ...`).

No torch here: runner processes stay light.
"""
