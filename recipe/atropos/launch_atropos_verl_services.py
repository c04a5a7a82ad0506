"""Launch an Atropos + verl run: environment service, optional inference workers, trainer.

    python recipe/atropos/launch_atropos_verl_services.py --config recipe/atropos/config/gsm8k_grpo_example.yaml \
        [--dry-run] [--console] [hydra overrides...]

What to start comes from the config's ``launcher:`` section; ``--help`` and docs/launcher.md
describe every option and key. The code lives in ``recipe/atropos/launcher/``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root (two levels up) on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipe.atropos.launcher.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
