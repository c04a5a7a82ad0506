"""verifiers environments (verifiers 0.4.0, `verifiers.v1`) in trajectory mode: the runner process of
an entry `type: verifiers` of `trainer.atropos.environments` (docs/verifiers.md).

Only how an episode is played is here; the episode core (recipe/atropos/episodes) does the rest
(groups, credit, ScoredData, run-api, failure counting).

- spec.py: `VerifiersEnvSpec`, the entry's keys (the core's `EpisodeEnvSpec` plus env, env_args,
  sampling_args, renderer).
- loading.py: `load_env`, the environment imported (`module:callable` or an installed package's id) and
  made local (subprocess runtime, in-process harness), or refused naming what would reach out.
- harness.py: `InProcessChatHarness`, verifiers' tool-less chat loop without a program to install.
- plugins.py: `register`, a verifiers plugin id for a class defined in any module.
- rendering.py: `ChatTemplateBridgeRenderer`, exact multi-turn token sequences for models the renderers
  package does not know (the policy's own chat template, previous turns never re-tokenized).
- convert.py: `to_episode`, a finished verifiers episode as the core's `Episode` (exact tokens, masks,
  log-probs, reward, the environment's own per-token advantages when it set them).
- runner.py: `run`, start-up checks, then the core's episode loop with verifiers' training client.
- service.py, prepare_data.py: evaluate mode, a single-turn verifiers task scoring verl's own
  responses through the environment-service protocol, and verl's parquet from its taskset.
- examples/arithmetic.py: the CPU demo's environment.

`python -m recipe.atropos.verifiers --name NAME --spec-json JSON --policy-url URL --run-api URL
--tokenizer DIR` (the launcher starts it).
"""
