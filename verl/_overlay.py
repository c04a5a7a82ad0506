"""This repo's `verl/` folder is an overlay on the installed verl release.

Python finds `verl` here first (the repo root is on PYTHONPATH, ahead of site-packages). Every
package `__init__` and every module of this overlay runs the installed release's own source inside
its own namespace (nothing is copied), then changes what it must. Packages also append the
installed folder to `__path__`, so each module this repo lacks resolves to the installed release.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import sys
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


@functools.cache
def installed_package_dir() -> str:
    """The installed verl package folder: the first `verl` on sys.path that is not this repo's."""
    search_path = [p for p in sys.path if os.path.realpath(p or os.curdir) != REPO_ROOT]
    spec = importlib.machinery.PathFinder.find_spec("verl", search_path)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "This repo's verl/ only overlays the installed verl release, and none is installed in this "
            f"environment ({sys.executable}). Run `make install`, or `pip install 'verl[verl-core]==0.9.1'`."
        )
    return os.path.realpath(list(spec.submodule_search_locations)[0])


def installed_source_file(module_name: str) -> str:
    """Source file of `module_name` (e.g. "verl.trainer.ppo.core_algos") in the installed release."""
    parts = module_name.split(".")
    if parts[0] != "verl":
        raise ValueError(f"{module_name!r} is not a verl module")
    base = os.path.join(installed_package_dir(), *parts[1:])
    path = os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"
    if not os.path.isfile(path):
        raise ImportError(f"the installed verl release has no module {module_name} (looked for {path})")
    return path


def exec_installed(namespace: dict[str, Any]) -> None:
    """Run the installed release's source of the module owning `namespace` inside that namespace.

    The module's `__file__` names the installed file while it runs (verl's `__init__` reads its
    version file relative to it), and `__name__` is the real dotted name even when this module runs
    as `__main__` (so upstream's own `if __name__ == "__main__"` block stays quiet).
    """
    spec = namespace.get("__spec__")
    module_name = spec.name if spec is not None else namespace["__name__"]
    path = installed_source_file(module_name)
    if namespace.get("__path__") is not None and os.path.dirname(path) not in namespace["__path__"]:
        namespace["__path__"].append(os.path.dirname(path))
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    own_file, own_name = namespace.get("__file__"), namespace["__name__"]
    namespace["__file__"], namespace["__name__"] = path, module_name
    try:
        exec(code, namespace)
    finally:
        namespace["__file__"], namespace["__name__"] = own_file, own_name


def export_repo_root_to_workers() -> None:
    """Put the repo root on PYTHONPATH so that processes started from here (Ray's raylet, its
    workers, subprocesses) import this overlay too, even when only `python -m` put it on sys.path."""
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(os.path.realpath(p) == REPO_ROOT for p in current):
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *current])
