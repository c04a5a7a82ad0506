"""`python -m recipe.atropos.openenv --name NAME --spec-json JSON --policy-url URL --run-api URL --tokenizer DIR`:
the driver of one `type: openenv` entry (started by the launcher in trajectory mode; runner.py)."""

import sys

from recipe.atropos.episodes.cli import runner_main
from recipe.atropos.openenv.runner import run

if __name__ == "__main__":
    sys.exit(runner_main("openenv", run))
