"""Example entry point: GRPO on GSM8K with advantages from the environment service.

    python recipe/atropos/example_gsm8k_grpo.py --config-name gsm8k_grpo_example [hydra overrides...]

The same run as `python -m verl.trainer.main_ppo --config-path recipe/atropos/config --config-name
gsm8k_grpo_example`: configs come from recipe/atropos/config, and the trainer class from the
config's `trainer_cls` (RayGRPOAtroposTrainer).
"""

import os
import sys

# Run as a file, Python puts this folder on sys.path, not the repo root: the repo root must come
# first so that `verl` is this repo's overlay.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if sys.path[0] != _REPO_ROOT:
    sys.path.insert(0, _REPO_ROOT)

import hydra  # noqa: E402

from verl.trainer.main_ppo import run_with_config  # noqa: E402


@hydra.main(config_path="config", config_name="gsm8k_grpo_example", version_base=None)
def main(config) -> None:
    run_with_config(config)


if __name__ == "__main__":
    main()
