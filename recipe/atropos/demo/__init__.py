"""The CPU demo (`make demo`): the offline tiny assets, the run through the launcher, its report.

``python -m recipe.atropos.demo`` (cli.py) builds the assets (tiny_assets.py: a tiny tokenizer,
Qwen2 model and GSM8K-style and reasoning-gym data, no downloads), runs the launcher, prints each
step and the summary and plots the reward (run_report.py). Tests and benchmarks build the same
assets.
"""
