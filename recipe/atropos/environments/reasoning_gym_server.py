"""reasoning-gym environment service: ``python recipe/atropos/environments/reasoning_gym_server.py serve
--slurm false --env.tasks basic_arithmetic,leg_counting``.

Serves on 127.0.0.1:9001 by default; ``serve --help`` lists every option. Ground truths are the
JSON objects ``recipe/atropos/prepare_reasoning_gym.py`` writes (see ``reasoning_gym_env.py``).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file path: put the repo root (three levels up) on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from recipe.atropos.environments.reasoning_gym_env import ReasoningGymEnvironment  # noqa: E402
from recipe.atropos.environments.service import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(ReasoningGymEnvironment, prog="reasoning_gym_server.py"))
