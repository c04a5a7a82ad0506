"""The ``launcher:`` section of a recipe config: what to start, where, and how to supervise it.

The section lives in the same file as the trainer's config (composed from
``config/launcher_defaults.yaml`` as ``launcher_defaults@launcher``), so one file and one set of
Hydra overrides describe the whole run. It is read with Hydra's compose API, so that
``launcher.environment.port=9002`` on the command line works like any trainer override, and an
override with a typo fails here, before anything starts.

Every field is checked when the section is read; errors name the field
(``launcher.environment.port``), never just "invalid config".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# trainer.atropos is read through the trainer's own definition: a key the trainer accepts, the
# launcher accepts, and a bad one stops the launch before anything starts.
from recipe.atropos.config import MODES, AtroposTrainerConfig

__all__ = [
    "AtroposEnvironmentConfig",
    "EnvironmentConfig",
    "EnvironmentServiceConfig",
    "InferenceConfig",
    "LauncherConfig",
    "LauncherConfigError",
    "MODES",
    "SECRET_KEYS",
    "PolicyEndpointConfig",
    "TrainerConfig",
    "TrajectoryApiConfig",
    "load_launcher_config",
    "mask_secret_override",
    "override_key",
    "parse_launcher_section",
]

SECTION = "launcher"
# What the launcher starts follows the trainer's trainer.atropos.mode.
MODE_KEY = "trainer.atropos.mode"
ATROPOS_KEY = "trainer.atropos"
# Keys of the composed config that hold secrets: the launcher hands them to processes through
# environment variables and keeps them off every command line and printed config.
SECRET_KEYS = (
    "trainer.atropos.api_key",
    "trainer.atropos.policy_api_key",
    "launcher.environment.api_key",
    "launcher.inference.api_key",
)
DEVICE_KEY = "trainer.device"
# Fields of LauncherConfig read from the rest of the composed config, not from the section.
_NOT_SECTION_KEYS = ("mode", "config_secrets", "policy_gateway_host", "trainer_device")


class LauncherConfigError(ValueError):
    """The config file, an override or a field of the launcher section is wrong."""


@dataclass(frozen=True)
class EnvironmentConfig:
    """The environment service (one process, restarted when it dies)."""

    command: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 9001
    health_path: str = "/health"
    start_timeout_s: float = 120.0
    max_restarts: int = 3
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    stable_after_s: float = 300.0
    api_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EnvironmentServiceConfig(EnvironmentConfig):
    """One more environment service of evaluate mode (``launcher.environment_services``): the
    fields of ``launcher.environment`` and a name (its process is ``environment-<name>``). Several
    environments in one run (``trainer.atropos.environments``, docs/many_environments.md)."""

    name: str


@dataclass(frozen=True)
class InferenceConfig:
    """OpenAI-compatible inference workers (vLLM's server), started only when ``enabled``."""

    command: tuple[str, ...]
    enabled: bool = False
    model: str | None = None
    served_model_name: str | None = None
    count: int = 1
    gpus_per_worker: int = 1
    gpu_ids: tuple[int, ...] | None = None
    host: str = "127.0.0.1"
    base_port: int = 9100
    ports: tuple[int, ...] | None = None
    extra_args: tuple[str, ...] = ()
    health_path: str = "/health"
    start_timeout_s: float = 900.0
    api_key: str | None = None
    register: bool = True
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainerConfig:
    """The trainer process; its exit ends the run."""

    command: tuple[str, ...]
    pass_config: bool = True
    api_url_override: str | None = "trainer.atropos.api_url"
    trajectory_api_url_override: str | None = "trainer.atropos.trajectory_api_url"
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrajectoryApiConfig:
    """atroposlib's trajectory API (``run-api``), trajectory mode only; its death ends the run."""

    command: tuple[str, ...] = ("python", "-m", "atroposlib.cli.run_api", "--host", "{host}", "--port", "{port}")
    host: str = "127.0.0.1"
    port: int = 8000
    health_path: str = "/"
    start_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyEndpointConfig:
    """The trainer's own policy inference endpoint that the environments generate through."""

    base_url: str = "http://127.0.0.1:8001/v1"
    health_path: str = "/health"
    start_timeout_s: float = 900.0
    model: str | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class AtroposEnvironmentConfig:
    """One Atropos environment process (trajectory mode), restarted when it dies."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 3
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    stable_after_s: float = 300.0
    # Working directory of this environment (relative: to launcher.workdir); null: launcher.workdir.
    workdir: str | None = None
    # Start `python FILE ...` / `python -m MODULE ...` through recipe.atropos.environments.run_env,
    # which lets atroposlib 0.4.0 run under transformers 5 (see atroposlib_compat.py).
    atroposlib_compat: bool = True
    # Words appended to the command as written, no {placeholder} filled (an episode runner's entry as
    # JSON, whose prompt templates have braces of their own).
    literal_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class LauncherConfig:
    """The whole ``launcher:`` section."""

    environment: EnvironmentConfig
    trainer: TrainerConfig
    inference: InferenceConfig
    trajectory_api: TrajectoryApiConfig = field(default_factory=TrajectoryApiConfig)
    policy_endpoint: PolicyEndpointConfig = field(default_factory=PolicyEndpointConfig)
    environments: tuple[AtroposEnvironmentConfig, ...] = ()
    # Evaluate mode: environment services started, waited for and restarted like `environment`.
    environment_services: tuple[EnvironmentServiceConfig, ...] = ()
    # Not keys of the section: set from the composed config (trainer.atropos.mode, the SECRET_KEYS
    # that are set, trainer.atropos.policy_gateway_host, trainer.device).
    mode: str = "evaluate"
    config_secrets: dict[str, str] = field(default_factory=dict)
    policy_gateway_host: str = "127.0.0.1"
    trainer_device: str | None = None
    log_dir: str = "outputs/launch"
    run_dir: str | None = None
    console: bool = False
    workdir: str | None = None
    shutdown_grace_s: float = 15.0
    progress_interval_s: float = 5.0
    poll_interval_s: float = 0.5


# --------------------------------------------------------------------------------------------
# Reading the section
# --------------------------------------------------------------------------------------------


def load_launcher_config(config_file: Path, overrides: Sequence[str]) -> LauncherConfig:
    """Compose ``config_file`` with ``overrides`` (as the trainer will) and read its launcher section."""
    config_file = Path(config_file)
    if config_file.suffix not in (".yaml", ".yml"):
        raise LauncherConfigError(f"--config must name a .yaml file, got {str(config_file)!r}")
    if not config_file.is_file():
        raise LauncherConfigError(f"--config {str(config_file)!r}: no such file")

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    all_overrides = list(overrides)
    local_searchpath = _local_searchpath_override(config_file, overrides)
    if local_searchpath is not None:
        all_overrides.append(local_searchpath)
    try:
        with initialize_config_dir(config_dir=str(config_file.resolve().parent), version_base=None):
            cfg = compose(config_name=config_file.stem, overrides=all_overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        shown = [mask_secret_override(o) for o in overrides]
        raise LauncherConfigError(f"cannot compose {config_file} with overrides {shown}: {exc}") from exc
    if SECTION not in cfg or cfg[SECTION] is None:
        raise LauncherConfigError(
            f"{config_file} has no '{SECTION}:' section: add `- launcher_defaults@launcher` to its defaults "
            "list (before `_self_`), or write the section yourself"
        )
    try:
        section = OmegaConf.to_container(cfg[SECTION], resolve=True)
        atropos_node = OmegaConf.select(cfg, ATROPOS_KEY, default=None)
        secrets = {key: OmegaConf.select(cfg, key, default=None) for key in SECRET_KEYS}
        device = OmegaConf.select(cfg, DEVICE_KEY, default=None)
    except OmegaConfBaseException as exc:
        raise LauncherConfigError(f"cannot resolve the {SECTION} section of {config_file}: {exc}") from exc
    try:
        # As written (keys are not read from the environment here: the plan hands them over).
        atropos = AtroposTrainerConfig.parse(atropos_node)
    except ValueError as exc:
        raise LauncherConfigError(f"{config_file}: {exc}") from exc
    launcher = parse_launcher_section(section, mode=atropos.mode)
    return dataclasses.replace(
        launcher,
        environments=launcher.environments + episode_runners(atropos.environments),
        config_secrets={key: str(value) for key, value in secrets.items() if value not in (None, "")},
        policy_gateway_host=atropos.policy_gateway_host,
        trainer_device=None if device is None else str(device),
    )


def episode_runners(environments: Any) -> tuple[AtroposEnvironmentConfig, ...]:
    """The runner process of each episode entry of ``trainer.atropos.environments`` (type verifiers or
    openenv: recipe/atropos/episodes/cli.py), supervised and restarted like launcher.environments."""
    from recipe.atropos.episodes.spec import is_episode_entry

    return tuple(
        AtroposEnvironmentConfig(
            name=name,
            command=("python", "-m", f"recipe.atropos.{entry['type']}", "--name", "{name}",
                     "--policy-url", "{policy_base_url}", "--run-api", "{trajectory_api_url}", "--tokenizer", "{tokenizer}"),
            literal_args=("--spec-json", json.dumps(entry, sort_keys=True)),
            atroposlib_compat=False,
            env={"HF_HUB_OFFLINE": "1"},
        )
        for name, entry in (environments or {}).items()
        if is_episode_entry(entry)
    )


def parse_launcher_section(section: Any, mode: Any = "evaluate") -> LauncherConfig:
    """Check and convert a plain ``launcher`` mapping; raises naming the offending field.

    ``mode`` is the trainer's ``trainer.atropos.mode``: it says what the launcher starts.
    """
    if isinstance(section, Mapping) and "mode" in section:
        raise LauncherConfigError(f"{SECTION}.mode is not a key: the launcher follows {MODE_KEY}; set that instead")
    if mode not in MODES:
        raise LauncherConfigError(f"{MODE_KEY} must be one of {list(MODES)}, got {mode!r}")
    cfg = _build(LauncherConfig, section, SECTION)
    for key in ("environments", "environment_services"):
        names = [e.name for e in getattr(cfg, key)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise LauncherConfigError(f"{SECTION}.{key}: names must be unique, repeated: {duplicates}")
    return dataclasses.replace(cfg, mode=mode)


def override_key(override: str) -> str:
    """The config key a Hydra override sets: ``++a.b=1`` -> ``a.b``, ``~a.b`` -> ``a.b``."""
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def mask_secret_override(override: str) -> str:
    """``trainer.atropos.api_key=abc`` -> ``trainer.atropos.api_key=***`` (other overrides as they are)."""
    if "=" in override and override_key(override) in SECRET_KEYS:
        return override.split("=", 1)[0] + "=***"
    return override


def _local_searchpath_override(config_file: Path, overrides: Sequence[str]) -> str | None:
    """Replace ``pkg://`` search paths by the folders they name, found without importing anything.

    Hydra imports a package to search it: ``pkg://verl.trainer.config`` would import verl, and
    with it torch and Ray (about 5 s). The trainer itself still gets the config untouched.
    Returns None (Hydra searches as written) when the user overrides ``hydra.searchpath`` or a
    package is not found as a folder on ``sys.path``.
    """
    if any(override_key(o) == "hydra.searchpath" for o in overrides):
        return None
    from omegaconf import OmegaConf

    try:
        primary = OmegaConf.load(config_file)
        searchpath = OmegaConf.select(primary, "hydra.searchpath", default=None)
    except Exception:  # a broken file: let compose report it properly
        return None
    if not searchpath or not any(str(entry).startswith("pkg://") for entry in searchpath):
        return None
    entries: list[str] = []
    for entry in (str(e) for e in searchpath):
        if not entry.startswith("pkg://"):
            entries.append(entry)
            continue
        relative = Path(*entry[len("pkg://") :].split("."))
        folders = [Path(p or os.curdir) / relative for p in sys.path]
        found = [f"file://{folder.resolve()}" for folder in folders if folder.is_dir()]
        if not found:
            return None
        entries.extend(dict.fromkeys(found))  # keeps sys.path order, an overlay before the release
    if any("'" in e or "\\" in e for e in entries):
        return None
    return "hydra.searchpath=[" + ",".join(f"'{e}'" for e in entries) + "]"


# --------------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------------

_MISSING = object()
_FIELD_CHECKS: dict[str, typing.Callable[[Any], str | None]] = {
    "port": lambda v: None if 1 <= v <= 65535 else "must be a TCP port (1-65535)",
    "base_port": lambda v: None if 1 <= v <= 65535 else "must be a TCP port (1-65535)",
    "count": lambda v: None if v >= 1 else "must be >= 1",
    "gpus_per_worker": lambda v: None if v >= 0 else "must be >= 0 (0: do not set CUDA_VISIBLE_DEVICES)",
    "max_restarts": lambda v: None if v >= 0 else "must be >= 0",
    "health_path": lambda v: None if v.startswith("/") else "must start with '/'",
    "command": lambda v: None if v else "must be a non-empty list of words",
    "name": lambda v: None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) else "must be letters, digits, _ . -",
    "base_url": lambda v: None if re.match(r"https?://[^/]+", v) else "must be an http(s):// URL",
}
_POSITIVE = {"start_timeout_s", "shutdown_grace_s", "progress_interval_s", "poll_interval_s"}
_NON_NEGATIVE = {"restart_backoff_s", "restart_backoff_max_s", "stable_after_s"}


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys, missing keys and wrong types are errors."""
    if not isinstance(data, Mapping):
        raise LauncherConfigError(f"{where} must be a mapping, got {type(data).__name__}: {data!r:.100}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not (cls is LauncherConfig and f.name in _NOT_SECTION_KEYS)}
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise LauncherConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, spec in known.items():
        path = f"{where}.{name}"
        raw = data.get(name, _MISSING)
        if raw is _MISSING:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise LauncherConfigError(f"{path} is required")
            continue
        value = _convert(hints[name], raw, path)
        problem = _FIELD_CHECKS[name](value) if name in _FIELD_CHECKS and value is not None else None
        if name in _POSITIVE and value <= 0:
            problem = "must be > 0"
        if name in _NON_NEGATIVE and value < 0:
            problem = "must be >= 0"
        if problem:
            raise LauncherConfigError(f"{path} {problem}, got {value!r}")
        values[name] = value
    return cls(**values)


def _convert(hint: Any, raw: Any, path: str) -> Any:
    """Convert one value to the annotated type (None, bool, int, float, str, tuples, str maps)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, raw, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, raw, path)
    if origin is tuple:
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise LauncherConfigError(f"{path} must be a list, got {type(raw).__name__}: {raw!r:.100}")
        return tuple(_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(raw))
    if origin is dict:
        if not isinstance(raw, Mapping):
            raise LauncherConfigError(f"{path} must be a mapping, got {type(raw).__name__}: {raw!r:.100}")
        return {str(k): _scalar_text(v, f"{path}.{k}") for k, v in raw.items()}
    if hint is bool:
        if not isinstance(raw, bool):
            raise LauncherConfigError(f"{path} must be true or false, got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise LauncherConfigError(f"{path} must be an integer, got {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise LauncherConfigError(f"{path} must be a number, got {raw!r}")
        return float(raw)
    if hint is str:
        return _scalar_text(raw, path)
    raise TypeError(f"no conversion for {hint!r} ({path})")  # a bug here, not in the config


def _scalar_text(raw: Any, path: str) -> str:
    """Command words and env values: YAML scalars (numbers, booleans) are taken as their text."""
    if raw is None or isinstance(raw, (Mapping, list, tuple)):
        raise LauncherConfigError(f"{path} must be a string, got {raw!r:.100}")
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw)
