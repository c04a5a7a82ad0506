"""`make demo`: the CPU demo (GRPO with advantages from the environment service, on a tiny model).

Not built yet: it needs verl's trainer to run on a CPU (the CPU-mode issue). Until then this says so
and exits non-zero, so nobody mistakes it for a run.
"""

import sys


def main() -> int:
    print(
        "make demo: the CPU demo is not built yet (it needs the CPU mode for verl's trainer).\n"
        "Nothing was run. `make test` runs the test suite.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
