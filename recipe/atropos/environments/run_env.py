"""Run an Atropos environment, unchanged, with atroposlib's transformers-5 compatibility applied.

    python -m recipe.atropos.environments.run_env path/to/some_env.py serve --slurm false ...
    python -m recipe.atropos.environments.run_env -m some_package.some_env serve ...

is ``python path/to/some_env.py serve ...`` (or ``python -m some_package.some_env ...``) after
:func:`recipe.atropos.environments.atroposlib_compat.apply`: the file runs as ``__main__``, with
its own folder first on ``sys.path`` and ``sys.argv`` as if Python had been started on it. The
launcher starts trajectory-mode environments this way (``launcher.environments[i].atroposlib_compat``).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

USAGE = "usage: python -m recipe.atropos.environments.run_env (ENV_FILE.py | -m MODULE) [ARGS...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        raise SystemExit(USAGE)
    from recipe.atropos.environments import atroposlib_compat

    atroposlib_compat.apply()
    if argv[0] == "-m":
        module, rest = argv[1], argv[2:]
        sys.argv = [module, *rest]  # runpy sets argv[0] to the module's file
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    path = Path(argv[0])
    if not path.is_file():
        raise SystemExit(f"run_env: {argv[0]!r} is not a file (cwd {Path.cwd()}). {USAGE}")
    sys.argv = [str(path), *argv[1:]]
    # As `python FILE` does: the file's folder leads sys.path (sibling imports of the environment).
    sys.path.insert(0, str(path.resolve().parent))
    runpy.run_path(str(path), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
