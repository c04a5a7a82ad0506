"""`python -m recipe.atropos.verifiers --name NAME --spec-json JSON --policy-url URL --run-api URL --tokenizer DIR`:
the runner of one `type: verifiers` entry (started by the launcher in trajectory mode; runner.py)."""

import os
import sys

# Offline before verifiers (and through it transformers and huggingface_hub) is imported: they read it
# once, at import. runner_main sets it again for the kinds that import late.
os.environ["HF_HUB_OFFLINE"] = "1"

from recipe.atropos.episodes.cli import runner_main  # noqa: E402
from recipe.atropos.verifiers.runner import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(runner_main("verifiers", run))
