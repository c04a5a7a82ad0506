"""OpenEnv environments trained in trajectory mode: the driver of `type: openenv` entries (docs/openenv.md).

An OpenEnv environment is a server (reset, then step with an action until done); the driver plays its
episodes with the policy being trained and pushes them, credited, to run-api. It speaks OpenEnv's wire
protocol itself (the `openenv` package stays in `.venv-openenv`, out of the trainer's venv):

- spec.py: `OpenEnvSpec`, the entry's settings (server, prompt, action mapping, limits, credit).
- session.py: one WebSocket `/ws` session (reset, step, state, close) and its errors; `/health`, `/schema`.
- link.py: `ServerLink`, the sessions of one server, reconnected with backoff; CAPACITY_REACHED waits.
- rendering.py: observation -> chat message -> the tokens appended to the episode (never re-tokenized).
- actions.py: the answer's text -> an action (the schema's one string field, a field, or a function).
- player.py: `EpisodePlayer`, one episode turn by turn through the policy gateway's token-in endpoint.
- child_server.py: `ChildServer`, the server an entry's `command` starts, restarted when it exits.
- runner.py / __main__.py: the driver process (`python -m recipe.atropos.openenv`, started by the launcher).
- service.py / prepare_data.py: a single-step OpenEnv environment as an evaluate-mode environment service,
  and verl's parquet from its resets.
- examples/: environments written with OpenEnv's server API (the CPU demo's), served from .venv-openenv.

Nothing here imports `openenv` except examples/ (which runs only in .venv-openenv).
"""
