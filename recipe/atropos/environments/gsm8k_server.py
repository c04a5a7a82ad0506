"""GSM8K environment service: ``python recipe/atropos/environments/gsm8k_server.py serve --slurm false``.

Serves on 127.0.0.1:9001 by default; ``serve --help`` lists every option.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root (three levels up) on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from recipe.atropos.environments.gsm8k import GSM8KEnvironment  # noqa: E402
from recipe.atropos.environments.service import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(GSM8KEnvironment, prog="gsm8k_server.py"))
