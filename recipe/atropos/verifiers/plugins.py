"""Give a verifiers plugin class (taskset, harness, environment) an id verifiers can load.

verifiers 0.4.0 finds a plugin by id only as a module: `verifiers.v1.<group>.<id>` (its built-in ones)
or a top-level module `<id>` exporting exactly one subclass in `__all__` (`utils/loaders.py`
`_import_plugin`). A class defined inside a package module (`my_pkg.envs`, a test file) has no such
id, and a dotted id fails in verifiers' own lookup. verifiers has no registry to add one to (the
missing seam), so `register` adds a one-class module under verifiers' plugin namespace to
`sys.modules` (Python's import system resolves from there first; nothing of verifiers is changed).
"""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types

__all__ = ["GROUPS", "register"]

# Plugin kind -> verifiers' package holding that kind's built-in plugins.
GROUPS = {"taskset": "verifiers.v1.tasksets", "harness": "verifiers.v1.harnesses", "environment": "verifiers.v1.envs"}
_ID = re.compile(r"^[a-z][a-z0-9_]*$")


def register(kind: str, cls: type, plugin_id: str | None = None) -> str:
    """Make `cls` loadable as the `kind` plugin `plugin_id` (default: `<module>_<class>`, lower case,
    non-alphanumerics as `_`); returns the id. Registering the same class twice is harmless; an id
    already taken by another class is an error."""
    if kind not in GROUPS:
        raise ValueError(f"plugin kind {kind!r} is not one of {sorted(GROUPS)}")
    plugin_id = plugin_id or re.sub(r"[^a-z0-9_]", "_", f"{cls.__module__}_{cls.__name__}".lower())
    if not _ID.match(plugin_id):
        raise ValueError(f"plugin id {plugin_id!r}: use lower-case letters, digits and '_', starting with a letter")
    name = f"{GROUPS[kind]}.{plugin_id}"
    existing = sys.modules.get(name)
    if existing is not None:
        if getattr(existing, cls.__name__, None) is not cls:
            raise ValueError(f"{kind} id {plugin_id!r} is already taken by {existing.__all__}; pick another id")
        return plugin_id
    module = types.ModuleType(name, f"{kind} plugin {plugin_id!r}: {cls.__module__}.{cls.__qualname__}")
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__all__ = [cls.__name__]
    setattr(module, cls.__name__, cls)
    sys.modules[name] = module
    return plugin_id
