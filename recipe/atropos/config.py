"""`trainer.atropos`: the settings of RayGRPOAtroposTrainer, defined once, here.

The keys stay flat (`trainer.atropos.api_url`), grouped below by the mode they apply to; each
field carries its documentation. Types are checked by OmegaConf's structured configs, ranges and
choices by each field's `check`. Two files are generated from this definition, and a test fails
when either is stale:
- `config/atropos_defaults.yaml`, which Hydra composes as `atropos_defaults@trainer.atropos`;
- the `trainer.atropos` options table of README.md (between its `atropos-options` markers).

    python -m recipe.atropos.config --write    # regenerate both after changing a field
    python -m recipe.atropos.config --check    # exit 1 if either is stale

The trainer (`from_config`) and the launcher (`parse`) read the section through this class, so a
key added here is accepted by both.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

API_KEY_ENV = "ATROPOS_API_KEY"
POLICY_API_KEY_ENV = "ATROPOS_POLICY_API_KEY"
MODES = ("evaluate", "trajectory")
ENCODINGS = ("auto", "json", "msgpack")
UNMATCHED_SAMPLES = ("keep", "drop")
ROLLOUT_PLACEMENTS = ("colocated", "separate")
SECTION = "trainer.atropos"
# The groups of keys, in the order the YAML and the README show them.
GROUPS = {"shared": "Both modes", "evaluate": "Evaluate mode", "trajectory": "Trajectory mode"}

# Range checks by what they require; the text is what an error says a value "must be".
_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_AT_LEAST_ONE = (">= 1", lambda v: v >= 1)
_PORT = ("in 0..65535", lambda v: 0 <= v <= 65535)


def _one_of(choices: tuple[str, ...]) -> tuple[str, Callable[[Any], bool]]:
    return f"one of {choices}", lambda v: v in choices


def _key(default: Any, group: str, doc: str, check: tuple[str, Callable[[Any], bool]] | None = None) -> Any:
    """One `trainer.atropos` key: its default, its mode group, its documentation, its range check."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata={"group": group, "doc": " ".join(doc.split()), "check": check})


@dataclasses.dataclass(frozen=True)
class AtroposTrainerConfig:
    """How the trainer talks to the environments, in either mode."""

    # ---- Both modes ---------------------------------------------------------------------------
    mode: str = _key("evaluate", "shared", """
        `evaluate`: verl generates and the environment service (`api_url`) judges. `trajectory`:
        Atropos environments generate through the policy gateway and push scored groups to
        atroposlib's `run-api` (`trajectory_api_url`); the trainer pulls each step's batch from
        there (docs/trajectory_mode.md). The launcher starts the services of this mode.""", _one_of(MODES))
    fallback_to_grpo: bool = _key(True, "shared", """
        Evaluate mode: when the service is down, slower than its limits, or answers something
        unusable, that step uses standard GRPO on verl's own reward, a warning is logged once per
        outage, and overrides resume when the service answers again. Trajectory mode: what run-api
        hands over that cannot be trained is dropped and counted. `false`: the run stops, with an
        error saying what failed and how to fix it.""")
    timeout: float = _key(30.0, "shared", """
        Seconds for one HTTP request to the environment service or run-api (cut to what is left of
        `max_wait_time`).""", _POSITIVE)
    retry_attempts: int = _key(5, "shared", "Most tries of one request, the first included.", _AT_LEAST_ONE)
    retry_delay: float = _key(1.0, "shared", "First backoff in seconds; doubles each retry, with jitter.", _NON_NEGATIVE)
    max_wait_time: float = _key(120.0, "shared", """
        Most seconds one call may take (evaluate mode: one step's request), retries and backoff
        included.""", _POSITIVE)
    api_key: str | None = _key(None, "shared", f"""
        Sent to the environment service and run-api as `Authorization: Bearer <key>`; `null` reads
        `{API_KEY_ENV}` from the environment.""")

    # ---- Evaluate mode: the environment service -----------------------------------------------
    api_url: str = _key("http://localhost:9001", "evaluate", """
        Base URL of the environment service (`/health`, `/evaluate_and_compute_advantages`).""")
    use_advantages: bool = _key(True, "evaluate", """
        Use the service's advantages as token-level overrides; `false`: standard GRPO on the
        service's scores (the service as a reward model).""")
    send_token_ids: bool = _key(True, "evaluate", """
        Send the exact response token ids (`false`: only their counts).""")
    encoding: str = _key("auto", "evaluate", """
        Request body encoding: `auto` (msgpack when the service offers it), `json`, `msgpack`.""",
        _one_of(ENCODINGS))
    # Any, not a dict type: the nested map is checked by evaluate/environments.py, whose errors name
    # the environment and its key (OmegaConf's would not).
    environments: Any = _key(None, "evaluate", """
        Several environment services, one per kind of data: a map `name: {api_url, data_sources:
        [verl data_source values], weight (optional), api_key_env (optional: the environment
        variable holding its key; else `api_key`, else the shared key)}`. Each sample goes to the
        environment owning its `data_source`, all of them at once; one that is down costs its own
        samples only (GRPO). Weights, when set on every environment, mix the training data by them.
        `null`: the single service at `api_url` (docs/many_environments.md). Trajectory mode: entries
        `type: verifiers` (docs/verifiers.md) or `type: openenv` (docs/openenv.md), each played by a
        runner process the launcher starts, pushing scored groups to run-api beside the
        environments of `launcher.environments`.""",
        ("a map name -> {api_url, data_sources, weight, api_key_env, api_key} or {type: verifiers|openenv, ...}",
         lambda v: _environments_ok(v)))

    # ---- Trajectory mode: run-api and the policy gateway --------------------------------------
    trajectory_api_url: str = _key("http://localhost:8000", "trajectory", """
        atroposlib's trajectory API (`run-api`) the trainer pulls batches from.""")
    batch_timeout_s: float = _key(600.0, "trajectory", """
        Most seconds a step waits for a full batch before the run stops, with a message saying
        what to check.""", _POSITIVE)
    policy_gateway_host: str = _key("127.0.0.1", "trajectory", """
        Where the policy gateway listens: the one address environments generate through. It
        spreads their requests over verl's rollout servers and holds them while the servers sleep
        and take new weights. `0.0.0.0` for environments on other nodes (then `policy_api_key` is
        required).""")
    policy_gateway_port: int = _key(8001, "trajectory", """
        The gateway's port, the environments' `--openai.base_url http://<host>:<port>/v1`; `0`: any
        free port (logged at start).""", _PORT)
    policy_hold_timeout_s: float = _key(1800.0, "trajectory", """
        Most seconds a request waits at the closed gateway (during a training step) before it gets
        503 with `Retry-After`.""", _POSITIVE)
    policy_drain_timeout_s: float = _key(120.0, "trajectory", """
        Most seconds the trainer waits for requests in flight to finish before the rollout servers
        sleep.""", _NON_NEGATIVE)
    policy_max_held_requests: int = _key(1024, "trajectory", """
        Most requests held at the closed gateway at once; beyond it 503 with `Retry-After`
        (`/health`: `requests_refused_full`). A held request whose client disconnects is dropped,
        never forwarded (`requests_abandoned`).""", _AT_LEAST_ONE)
    policy_api_key: str | None = _key(None, "trajectory", f"""
        Bearer key the gateway requires on every route but `/health` (scheme case-insensitive);
        `null` reads `{POLICY_API_KEY_ENV}`. Required when `policy_gateway_host` is not loopback
        (the trainer refuses to start). The launcher gives it to environments as
        `{{policy_api_key}}`; prefer the environment variable to writing it here (verl prints its
        config, this key included, into the trainer's log).""")
    max_staleness: int = _key(8, "trajectory", """
        Most weights versions a trained sample may lag: the policy gateway records which training
        step's weights generated each completion, and a group with any sample more than this many
        steps older than the weights the trainer holds is dropped (`atropos/dropped_groups/stale`),
        its place filled from later groups. 8, as prime-rl's `max_off_policy_steps` and verl's
        `max_off_policy_threshold`: environments routinely run 1-3 steps ahead, which verl's
        `algorithm.rollout_correction` (fed the recorded log-probs) corrects; far beyond that the
        importance weights are mostly clipped and the sample teaches little. `0`: on-policy only.
        The gateway keeps `max_staleness + 2` versions of records (docs/trajectory_mode.md).""", _NON_NEGATIVE)
    unmatched_samples: str = _key("keep", "trajectory", """
        What to do with a sample whose generated tokens the gateway never produced (an environment
        that re-tokenizes the text it got back, or generates elsewhere), so neither its staleness
        nor its behaviour log-probs are known: `keep` trains it with an importance weight of 1
        (counted: `atropos/behavior_matched_fraction`); `drop` drops its group
        (`atropos/dropped_groups/unmatched`). `keep` by default so that such environments still
        train; `drop` for a strict staleness bound (required by `rollout_correction.bypass_mode`).""",
        _one_of(UNMATCHED_SAMPLES))
    rollout_placement: str = _key("colocated", "trajectory", """
        Where the rollout servers run. `colocated`: on the actor's devices, asleep while it trains
        (the gateway holds environments' requests for the whole update). `separate`: on a resource
        pool of their own (`actor_rollout_ref.rollout.nnodes` x `n_gpus_per_node`; on CPU, logical
        GPU slots that `ray_kwargs.ray_init.num_gpus` must also count), through verl's separation
        seam: environments keep generating while the actor updates, the gateway pauses only for
        each weight swap, and `max_staleness` bounds what that costs (docs/async.md).""",
        _one_of(ROLLOUT_PLACEMENTS))

    @classmethod
    def parse(cls, node: Mapping[str, Any] | None) -> AtroposTrainerConfig:
        """The section as written (a DictConfig or dict), every key checked, nothing read from the
        environment; missing keys take their defaults. Raises ValueError naming the key, the value
        and what it must be."""
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        values = dict(node or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, values)) - set(known))
        if unknown:
            raise ValueError(f"{SECTION} has unknown keys {unknown}; known: {sorted(known)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in values.items():
            # OmegaConf converts "5" to 5 for an int, as for Hydra overrides, but a bool is no number.
            if isinstance(value, bool) and types[name] in ("int", "float"):
                raise ValueError(f"{SECTION}.{name} must be {types[name]}, got {value!r}")
        try:
            config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
        except OmegaConfBaseException as exc:
            name = str(exc.key)
            raise ValueError(
                f"{SECTION}.{name} must be {types.get(name, '?')}, got {values.get(name)!r} ({str(exc).splitlines()[0]})"
            ) from exc
        for spec in dataclasses.fields(cls):
            check = spec.metadata["check"]
            value = getattr(config, spec.name)
            if check is not None and not check[1](value):
                raise ValueError(f"{SECTION}.{spec.name} must be {check[0]}, got {value!r}")
        _check_environment_kinds(config.mode, config.environments)
        if config.rollout_placement == "separate" and config.mode != "trajectory":
            raise ValueError(
                f"{SECTION}.rollout_placement=separate needs {SECTION}.mode=trajectory (environments generate "
                f"through the policy gateway while the actor trains); got mode={config.mode!r}"
            )
        return config

    @classmethod
    def from_config(
        cls, node: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> AtroposTrainerConfig:
        """What the trainer runs with: `parse`, then the keys left null read from `environ` (the
        process's by default), then, in trajectory mode, a gateway beyond loopback needs a key."""
        environ = os.environ if environ is None else environ
        config = cls.parse(node)
        from_env = {
            key: environ[variable]
            for key, variable in (("api_key", API_KEY_ENV), ("policy_api_key", POLICY_API_KEY_ENV))
            if getattr(config, key) is None and environ.get(variable)
        }
        config = dataclasses.replace(config, **from_env)
        if config.mode == "trajectory":
            check_gateway_exposure(config.policy_gateway_host, config.policy_api_key)
        return config


def _environments_ok(value: Any) -> bool:
    """`environments` checked in full; raises ValueError naming the environment, key and fix."""
    from recipe.atropos.evaluate.environments import parse_environment_specs  # stdlib only, no cycle

    parse_environment_specs(value)
    return True


def _check_environment_kinds(mode: str, environments: Any) -> None:
    """Episode entries (type verifiers/openenv) play episodes: trajectory mode only; services judge
    verl's samples: evaluate mode only."""
    from recipe.atropos.episodes.spec import is_episode_entry

    for name, entry in (environments or {}).items():
        episode = is_episode_entry(entry)
        if mode == "evaluate" and episode:
            raise ValueError(
                f"{SECTION}.environments.{name}: type {entry['type']} plays episodes, which needs "
                f"{SECTION}.mode=trajectory; in evaluate mode serve the environment as a service "
                f"(docs/{entry['type']}.md, 'Evaluate mode') and give its api_url and data_sources")
        if mode == "trajectory" and not episode:
            raise ValueError(
                f"{SECTION}.environments.{name}: an environment service (api_url) judges verl's own samples, "
                f"which needs {SECTION}.mode=evaluate; in trajectory mode give it `type: verifiers` or "
                "`type: openenv`, or run an Atropos environment under launcher.environments")


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost); wildcards and
    other names are not (a name may resolve to any interface)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_gateway_exposure(host: str, api_key: str | None) -> None:
    """Refuse a policy gateway that other machines can reach without a key: anyone there could
    generate with the policy and fill its queue."""
    if not is_loopback_host(host) and not api_key:
        raise ValueError(
            f"trainer.atropos.policy_gateway_host={host!r} lets other machines reach the policy gateway, which "
            f"then needs a key: set trainer.atropos.policy_api_key (or ${POLICY_API_KEY_ENV}) and give it to the "
            "environments (launcher placeholder {policy_api_key}), or keep policy_gateway_host=127.0.0.1"
        )


# --------------------------------------------------------------------------------------------
# The generated files
# --------------------------------------------------------------------------------------------

_HERE = Path(__file__).resolve().parent
DEFAULTS_YAML = _HERE / "config" / "atropos_defaults.yaml"
README = _HERE.parents[1] / "README.md"
README_BEGIN = "<!-- atropos-options: generated by `python -m recipe.atropos.config --write` from recipe/atropos/config.py -->"
README_END = "<!-- /atropos-options -->"


def _fields_by_group() -> dict[str, list[dataclasses.Field]]:
    groups: dict[str, list[dataclasses.Field]] = {group: [] for group in GROUPS}
    for spec in dataclasses.fields(AtroposTrainerConfig):
        groups[spec.metadata["group"]].append(spec)
    return groups


def _yaml_value(value: Any) -> str:
    return OmegaConf.to_yaml({"v": value}).strip()[len("v: "):]


def render_defaults_yaml() -> str:
    """config/atropos_defaults.yaml: every key with its default, its documentation as comments."""
    lines = [
        "# trainer.atropos: how RayGRPOAtroposTrainer talks to the environments. GENERATED from",
        "# recipe/atropos/config.py (python -m recipe.atropos.config --write); edit the fields there.",
        "# Composed under `trainer.atropos` by the recipe configs (atropos_defaults@trainer.atropos).",
    ]
    for group, specs in _fields_by_group().items():
        lines += ["", f"# ==== {GROUPS[group]} " + "=" * (90 - len(GROUPS[group]))]
        for spec in specs:
            lines += textwrap.wrap(
                spec.metadata["doc"], 98, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
            )
            lines.append(f"{spec.name}: {_yaml_value(spec.default)}")
    return "\n".join(lines) + "\n"


def render_readme_table() -> str:
    """The README's options table, one per mode group, between its markers (markers included)."""
    lines = [README_BEGIN]
    for group, specs in _fields_by_group().items():
        lines += ["", f"**{GROUPS[group]}**", "", "| key | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{s.name}` | `{_yaml_value(s.default)}` | {s.metadata['doc']} |" for s in specs]
    return "\n".join(lines + ["", README_END])


def _readme_with_table(text: str) -> str:
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md has no {README_BEGIN!r} ... {README_END!r} block to fill")
    return text[:begin] + render_readme_table() + text[end + len(README_END):]


def stale_files() -> list[Path]:
    """The generated files that differ from what this module would write."""
    stale = []
    if not DEFAULTS_YAML.is_file() or DEFAULTS_YAML.read_text() != render_defaults_yaml():
        stale.append(DEFAULTS_YAML)
    text = README.read_text()
    if _readme_with_table(text) != text:
        stale.append(README)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.atropos.config", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate atropos_defaults.yaml and the README table")
    action.add_argument("--check", action="store_true", help="exit 1 when either is stale")
    args = parser.parse_args(argv)
    if args.write:
        DEFAULTS_YAML.write_text(render_defaults_yaml())
        README.write_text(_readme_with_table(README.read_text()))
        return 0
    stale = stale_files()
    for path in stale:
        print(f"{path} is stale: run python -m recipe.atropos.config --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
