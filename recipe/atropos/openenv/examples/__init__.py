"""OpenEnv environments written with OpenEnv's own server API, served from `.venv-openenv`.

arithmetic_env.py: the CPU demo's single-step environment (reset gives a word problem, one step scores
the answer); also what the tests and the benchmark serve. These modules import `openenv`, which the
trainer's venv does not have: run them only from `.venv-openenv` (docs/openenv.md).
"""
