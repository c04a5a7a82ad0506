"""Stand-in trainer for the CPU platform tests: reports what verl's platform is in the process the
launcher started, then exits 0.

Writes to ``$PLATFORM_PROBE_OUT`` (JSON): its argv, ``VERL_PLATFORM``, ``VERL_USE_EXTERNAL_MODULES``
and ``verl.plugin.platform.get_platform().device_name`` (imported as the real trainer imports it).
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from verl.plugin.platform import get_platform

    report = {
        "argv": argv,
        "VERL_PLATFORM": os.environ.get("VERL_PLATFORM"),
        "VERL_USE_EXTERNAL_MODULES": os.environ.get("VERL_USE_EXTERNAL_MODULES"),
        "device_name": get_platform().device_name,
    }
    with open(os.environ["PLATFORM_PROBE_OUT"], "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
