"""`trainer.atropos.environments`: several environment services, each owning some verl data sources.

    environments:
      gsm8k: {api_url: http://127.0.0.1:9001, data_sources: [openai/gsm8k], weight: 0.7}
      rg:    {api_url: http://127.0.0.1:9002, data_sources: [reasoning_gym/leg_counting],
              weight: 0.3, api_key_env: RG_ENV_API_KEY}

Entries with `type: verifiers` or `type: openenv` are not services: they play episodes in trajectory
mode (recipe/atropos/episodes/spec.py checks them, the launcher starts a runner for each);
:func:`parse_environment_specs` checks them and leaves them out of what it returns.

Light imports only (pydantic for the episode entries): `config.py` checks the section with
:func:`parse_environment_specs` when it parses `trainer.atropos`, before anything heavy is imported.
Every error names the key, the value and the fix (docs/many_environments.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["EnvironmentSpec", "UnknownDataSourceError", "parse_environment_specs", "resolve_api_keys", "route_data_sources"]

KEY = "trainer.atropos.environments"
FIELDS = ("type", "api_url", "data_sources", "weight", "api_key_env", "api_key")
SERVICE_TYPE = "service"
EXAMPLE = "{api_url: http://127.0.0.1:9001, data_sources: [openai/gsm8k], weight: 1.0}"


@dataclasses.dataclass(frozen=True)
class EnvironmentSpec:
    """One environment service: where it is, which data sources it judges, its mixing weight, its key."""

    name: str
    api_url: str
    data_sources: tuple[str, ...]
    weight: float | None = None
    api_key_env: str | None = None
    api_key: str | None = None  # as written, or, after resolve_api_keys, the key it is sent

    @property
    def key_hint(self) -> str:
        """Where this environment's key is set, for an error about a refused key."""
        if self.api_key_env:
            return f"the environment variable {self.api_key_env} ({KEY}.{self.name}.api_key_env)"
        return f"{KEY}.{self.name}.api_key_env (or trainer.atropos.api_key / ATROPOS_API_KEY, shared)"


class UnknownDataSourceError(ValueError):
    """A sample's data_source belongs to no environment."""


def _fail(where: str, problem: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{where}: {problem}, got {value!r:.200}; {fix}")


def parse_environment_specs(node: Any) -> dict[str, EnvironmentSpec] | None:
    """The service entries of the section as written, checked (nothing read from the process
    environment; episode entries checked by their kind's spec and left out); None when there are none."""
    from recipe.atropos.episodes.spec import is_episode_entry, load_spec

    if node is None:
        return None
    if not isinstance(node, Mapping) or not node:
        raise _fail(KEY, "expected a map name -> {api_url, data_sources, ...} with at least one environment", node,
                    f"write e.g. `environments: {{gsm8k: {EXAMPLE}}}`, or null for the single service at api_url")
    specs: dict[str, EnvironmentSpec] = {}
    owner: dict[str, str] = {}
    for name, entry in node.items():
        where = f"{KEY}.{name}"
        if not isinstance(name, str) or not name or "/" in name:
            raise _fail(KEY, "environment names must be non-empty strings without '/' (they name metrics)", name,
                        "rename it, e.g. gsm8k")
        if is_episode_entry(entry):
            load_spec(name, entry)  # EpisodeSpecError (a ValueError) naming the field
            continue
        if not isinstance(entry, Mapping):
            raise _fail(where, "expected a map with api_url and data_sources", entry, f"write e.g. `{name}: {EXAMPLE}`")
        if entry.get("type", SERVICE_TYPE) != SERVICE_TYPE:
            raise _fail(f"{where}.type", "unknown kind", entry.get("type"),
                        "use service (an environment service at api_url, the default), verifiers or openenv")
        unknown = sorted(set(map(str, entry)) - set(FIELDS))
        if unknown:
            raise _fail(where, f"unknown keys {unknown}", dict(entry), f"use only {list(FIELDS)}")
        api_url = entry.get("api_url")
        if not isinstance(api_url, str) or not api_url.startswith(("http://", "https://")):
            raise _fail(f"{where}.api_url", "expected the service's base URL (http:// or https://)", api_url,
                        "set it to where the service listens, e.g. http://127.0.0.1:9001")
        sources = entry.get("data_sources")
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, (list, tuple)) or not sources or not all(isinstance(s, str) and s for s in sources):
            raise _fail(f"{where}.data_sources", "expected a non-empty list of verl data_source values", sources,
                        "list the data_source column values of the rows this environment judges")
        for source in sources:
            if source in owner and owner[source] != name:
                raise _fail(f"{where}.data_sources", f"{source!r} is already owned by environment {owner[source]!r}",
                            list(sources), "give each data_source to one environment")
            owner[source] = name
        weight = entry.get("weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise _fail(f"{where}.weight", "expected a finite number > 0 (or null)", weight,
                            "set its share of the training data, e.g. 0.5, or leave it out on every environment")
            weight = float(weight)
        api_key_env, api_key = entry.get("api_key_env"), entry.get("api_key")
        if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env):
            raise _fail(f"{where}.api_key_env", "expected the name of an environment variable", api_key_env,
                        "e.g. api_key_env: GSM8K_ENV_API_KEY")
        if api_key is not None and not isinstance(api_key, str):
            raise _fail(f"{where}.api_key", "expected a string", type(api_key).__name__, "quote it, or use api_key_env")
        if api_key_env and api_key:
            raise _fail(where, "api_key and api_key_env are both set", "<both>", "keep one (api_key_env keeps the key out of logs)")
        specs[name] = EnvironmentSpec(name, api_url.rstrip("/"), tuple(dict.fromkeys(sources)), weight, api_key_env, api_key)
    if not specs:
        return None
    weighted = [s.name for s in specs.values() if s.weight is not None]
    if weighted and len(weighted) != len(specs):
        missing = sorted(set(specs) - set(weighted))
        raise _fail(KEY, f"weight is set on {weighted} but not on {missing}", missing,
                    "set weight on every environment (mixing) or on none (the data as it comes)")
    return specs


def resolve_api_keys(
    specs: Mapping[str, EnvironmentSpec], shared_api_key: str | None, environ: Mapping[str, str]
) -> dict[str, EnvironmentSpec]:
    """Each environment's key: its variable (api_key_env, which must be set), else its own
    api_key, else the shared trainer.atropos.api_key (itself read from ATROPOS_API_KEY)."""
    resolved = {}
    for name, spec in specs.items():
        key = spec.api_key
        if spec.api_key_env:
            key = environ.get(spec.api_key_env)
            if not key:
                raise _fail(f"{KEY}.{name}.api_key_env", f"the environment variable {spec.api_key_env} is not set",
                            spec.api_key_env, f"export {spec.api_key_env}=<the service's key> before starting, "
                            "or remove api_key_env to use the shared trainer.atropos.api_key")
        resolved[name] = dataclasses.replace(spec, api_key=key or shared_api_key)
    return resolved


def route_data_sources(specs: Mapping[str, EnvironmentSpec], data_sources: Iterable[Any]) -> dict[str, str]:
    """data_source -> environment name for each value given; raises UnknownDataSourceError naming
    the values no environment owns, the environments and the fix."""
    owner = {source: spec.name for spec in specs.values() for source in spec.data_sources}
    values = sorted({str(s) for s in data_sources})
    unknown = [s for s in values if s not in owner]
    if unknown:
        known = {spec.name: list(spec.data_sources) for spec in specs.values()}
        raise UnknownDataSourceError(
            f"data_source {unknown} belongs to no environment in {KEY} (known: {known}); add each to the "
            f"data_sources of the environment that judges it, or drop those rows from data.train_files"
        )
    return {s: owner[s] for s in values}
