"""`trainer.atropos`: the typed settings of RayGRPOAtroposTrainer (defaults in config/atropos_defaults.yaml)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from typing import Any

API_KEY_ENV = "ATROPOS_API_KEY"
POLICY_API_KEY_ENV = "ATROPOS_POLICY_API_KEY"
_ENCODINGS = ("auto", "json", "msgpack")
_MODES = ("evaluate", "trajectory")
# What YAML may give for each annotation of the dataclass (ints are fine where floats are wanted).
_ACCEPTED_TYPES = {"str": str, "bool": bool, "float": (int, float), "int": int, "str | None": (str, type(None))}


@dataclasses.dataclass(frozen=True)
class AtroposTrainerConfig:
    """How the trainer talks to the environment service; every field is documented in README.md."""

    api_url: str = "http://localhost:9001"
    use_advantages: bool = True
    fallback_to_grpo: bool = True
    timeout: float = 30.0
    retry_attempts: int = 5
    retry_delay: float = 1.0
    max_wait_time: float = 120.0
    api_key: str | None = None
    send_token_ids: bool = True
    encoding: str = "auto"
    mode: str = "evaluate"
    trajectory_api_url: str = "http://localhost:8000"
    batch_timeout_s: float = 600.0
    policy_gateway_host: str = "127.0.0.1"
    policy_gateway_port: int = 8001
    policy_hold_timeout_s: float = 1800.0
    policy_drain_timeout_s: float = 120.0
    policy_max_held_requests: int = 1024
    policy_api_key: str | None = None

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> AtroposTrainerConfig:
        """Build from `trainer.atropos` (a DictConfig or dict); unknown keys and bad values are errors."""
        values = dict(node or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"trainer.atropos has unknown keys {unknown}; known: {sorted(known)}")
        for name, value in values.items():
            expected = _ACCEPTED_TYPES[known[name].type]
            if not isinstance(value, expected) or (known[name].type in ("float", "int") and isinstance(value, bool)):
                raise ValueError(f"trainer.atropos.{name} must be {known[name].type}, got {value!r}")
        for key, variable in (("api_key", API_KEY_ENV), ("policy_api_key", POLICY_API_KEY_ENV)):
            if values.get(key) is None and os.environ.get(variable):
                values[key] = os.environ[variable]
        config = cls(**values)
        if config.encoding not in _ENCODINGS:
            raise ValueError(f"trainer.atropos.encoding must be one of {_ENCODINGS}, got {config.encoding!r}")
        if config.mode not in _MODES:
            raise ValueError(f"trainer.atropos.mode must be one of {_MODES}, got {config.mode!r}")
        if config.timeout <= 0 or config.max_wait_time <= 0 or config.retry_attempts < 1 or config.retry_delay < 0:
            raise ValueError(
                "trainer.atropos needs timeout > 0, max_wait_time > 0, retry_attempts >= 1 and retry_delay >= 0; got "
                f"{config.timeout}, {config.max_wait_time}, {config.retry_attempts}, {config.retry_delay}"
            )
        if not 0 <= config.policy_gateway_port <= 65535:
            raise ValueError(f"trainer.atropos.policy_gateway_port must be in 0..65535, got {config.policy_gateway_port}")
        if config.batch_timeout_s <= 0 or config.policy_hold_timeout_s <= 0 or config.policy_drain_timeout_s < 0:
            raise ValueError(
                "trainer.atropos needs batch_timeout_s > 0, policy_hold_timeout_s > 0 and policy_drain_timeout_s >= 0; got "
                f"{config.batch_timeout_s}, {config.policy_hold_timeout_s}, {config.policy_drain_timeout_s}"
            )
        if config.policy_max_held_requests < 1:
            raise ValueError(f"trainer.atropos.policy_max_held_requests must be >= 1, got {config.policy_max_held_requests}")
        if config.mode == "trajectory":
            check_gateway_exposure(config.policy_gateway_host, config.policy_api_key)
        return config


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
