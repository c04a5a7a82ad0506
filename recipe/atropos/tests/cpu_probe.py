"""A CheckpointEngineManager for CPU-mode tests: after each weight sync, ask the rollout what it now thinks.

verl's trainer builds its checkpoint manager from `actor_rollout_ref.rollout.checkpoint_manager_class`.
This one runs verl's own `update_weights` (actor -> rollout), then asks each rollout replica's OpenAI
endpoint for the log-probs of a fixed text (`echo` with `max_tokens: 0`) and appends them, as one JSON
line per replica, to the file named by `$CPU_PROBE_OUTPUT`. A test then sees whether the weights
that reached the rollout after an update differ from the ones before it, through the same endpoint
environments use.
"""

from __future__ import annotations

import json
import os

import requests

from verl.checkpoint_engine import CheckpointEngineManager

PROBE_OUTPUT_ENV = "CPU_PROBE_OUTPUT"
PROBE_TEXT = "Tom has 3 apples and gets 4 more. How many apples does Tom have?"


class ProbingCheckpointEngineManager(CheckpointEngineManager):
    def update_weights(self, global_steps: int | None = None):
        result = super().update_weights(global_steps)  # verl's auto_await: runs to completion here
        with open(os.environ[PROBE_OUTPUT_ENV], "a", encoding="utf-8") as out:
            for replica in self.replicas:
                response = requests.post(
                    f"http://{replica.server_address}/v1/completions",
                    json={"prompt": PROBE_TEXT, "max_tokens": 0, "echo": True, "logprobs": 0},
                    timeout=30,
                )
                response.raise_for_status()
                choice = response.json()["choices"][0]
                record = {
                    "global_steps": global_steps,
                    "address": replica.server_address,
                    "token_logprobs": choice["logprobs"]["token_logprobs"],
                    "server": requests.get(f"http://{replica.server_address}/health", timeout=30).json(),
                }
                out.write(json.dumps(record) + "\n")
        return result
