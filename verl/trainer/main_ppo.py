"""Overlay of verl's PPO entry point: adds `trainer_cls=<dotted path>`.

    python -m verl.trainer.main_ppo ... trainer_cls=recipe.atropos.grpo_atropos_trainer.RayGRPOAtroposTrainer

runs verl's legacy TaskRunner (`trainer.use_v1=false`) with that `RayPPOTrainer` subclass in place
of `RayPPOTrainer`, built with the same constructor arguments. The key may also be set in a config
file. Without `trainer_cls` everything is upstream's, unchanged: the installed module's source runs
in this namespace (verl/_overlay.py) and upstream's `main` body is called as it is.
"""

from verl import _overlay

_overlay.exec_installed(globals())

import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from verl.utils.import_utils import load_class_from_fqn  # noqa: E402

TRAINER_CLS_KEY = "trainer_cls"
_UPSTREAM_CONFIG_DIR = os.path.join(os.path.dirname(_overlay.installed_source_file("verl.trainer.main_ppo")), "config")
_upstream_main_body = main.__wrapped__  # noqa: F821 - upstream's hydra-decorated main, executed above
_upstream_run_ppo = run_ppo  # noqa: F821 - upstream's, executed above


class TrainerClassError(ValueError):
    """`trainer_cls` names nothing importable, or something that is not a RayPPOTrainer subclass."""


def load_trainer_cls(dotted_path: str) -> type:
    """Import `dotted_path` and check that it is a RayPPOTrainer subclass."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    try:
        trainer_cls = load_class_from_fqn(dotted_path, description=TRAINER_CLS_KEY)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TrainerClassError(f"{TRAINER_CLS_KEY}={dotted_path} cannot be imported: {exc}") from exc
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, RayPPOTrainer)):
        raise TrainerClassError(
            f"{TRAINER_CLS_KEY}={dotted_path} is {trainer_cls!r}, not a subclass of "
            "verl.trainer.ppo.ray_trainer.RayPPOTrainer"
        )
    return trainer_cls


@contextlib.contextmanager
def _legacy_task_runner_builds(trainer_cls: type):
    """verl's legacy TaskRunner builds `trainer_cls` instead of RayPPOTrainer while this is open."""
    import verl.trainer.main_ppo_v0 as main_ppo_v0

    # Missing seam: TaskRunner.run builds its trainer from main_ppo_v0's module-global `RayPPOTrainer`
    # and takes no class argument. Ray ships the TaskRunner class to its actor by value, capturing
    # that global when the actor is created, so it is swapped here, in the driver, for this run.
    upstream_cls = main_ppo_v0.RayPPOTrainer
    main_ppo_v0.RayPPOTrainer = trainer_cls
    try:
        yield
    finally:
        main_ppo_v0.RayPPOTrainer = upstream_cls


def run_ppo(config, task_runner_class) -> None:
    """Upstream's `run_ppo`; with `trainer_cls` set, the legacy TaskRunner builds that class."""
    trainer_cls_path = config.get(TRAINER_CLS_KEY)
    if not trainer_cls_path:
        return _upstream_run_ppo(config, task_runner_class)
    if task_runner_class is TaskRunnerV1:  # noqa: F821 - upstream's, executed above
        raise TrainerClassError(f"{TRAINER_CLS_KEY} needs verl's legacy trainer: set trainer.use_v1=false")
    with _legacy_task_runner_builds(load_trainer_cls(trainer_cls_path)):
        return _upstream_run_ppo(config, _OnDriverNode(task_runner_class))


# The driver's variables with these prefixes go to the TaskRunner too (see _OnDriverNode).
_DRIVER_ENV_PREFIXES = ("ATROPOS_",)


def driver_env_vars(environ=os.environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(_DRIVER_ENV_PREFIXES)}


class _OnDriverNode:
    """verl's TaskRunner actor class, placed on the node of the process that started the trainer,
    with the recipe's settings from that process's environment.

    Missing seam: upstream's `run_ppo` creates the TaskRunner with `task_runner_class.remote()` and
    no placement, so on a multi-node cluster the trainer's loop (and with it the policy gateway of
    trajectory mode, which environments must find at a known address) may land on any node. Ray's
    NodeAffinitySchedulingStrategy keeps it on the driver's node, resolved once Ray is up.

    An actor gets the environment of its node's raylet, i.e. of `ray start` when the cluster was
    started before the driver (SLURM, any multi-node cluster), not the driver's: the ATROPOS_*
    variables the launcher gives the trainer (the gateway's and the service's keys, taken out of
    the config so that verl does not print them; the run folder) go along as runtime_env env_vars.
    """

    def __init__(self, actor_class):
        self._actor_class = actor_class

    def options(self, **kwargs):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node_id = ray.get_runtime_context().get_node_id()
        strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        env_vars = {**driver_env_vars(), **runtime_env.get("env_vars", {})}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        return self._actor_class.options(scheduling_strategy=strategy, runtime_env=runtime_env or None, **kwargs)

    def remote(self, *args, **kwargs):
        return self.options().remote(*args, **kwargs)


class PlatformMismatchError(RuntimeError):
    """The config asks for a device that this process's verl platform does not drive."""


def check_cpu_platform(config: DictConfig) -> None:
    """A config made for CPU (trainer.device=cpu) on a process whose verl platform is not the CPU one
    stops here, before Ray starts: otherwise verl falls back to CUDA and the run dies about 30 s later
    inside a Ray worker with "Distributed package doesn't have NCCL built in"."""
    if config.get("trainer", {}).get("device") != "cpu":
        return
    from verl.plugin.platform import get_platform

    found = get_platform().device_name
    if found != "cpu":
        raise PlatformMismatchError(
            f"trainer.device=cpu, but verl's platform in this process is {found!r} "
            f"(VERL_PLATFORM={os.environ.get('VERL_PLATFORM', '<unset>')}): run with VERL_PLATFORM=cpu "
            "VERL_USE_EXTERNAL_MODULES=recipe.atropos.cpu in the environment (the launcher sets both for a CPU "
            "config), or set trainer.device to your accelerator"
        )


def run_with_config(config: DictConfig) -> None:
    """Run a composed config as `python -m verl.trainer.main_ppo` does (recipe entry points call this)."""
    check_cpu_platform(config)  # before Ray starts
    trainer_cls_path = config.get(TRAINER_CLS_KEY)
    if trainer_cls_path:
        trainer_cls = load_trainer_cls(trainer_cls_path)  # fail here, before Ray starts
        if config.trainer.use_v1:
            print(f"{TRAINER_CLS_KEY}={trainer_cls.__module__}.{trainer_cls.__qualname__}: using verl's legacy trainer")
            with open_dict(config):
                config.trainer.use_v1 = False
    # Upstream's body; its `run_ppo` is looked up in this module's namespace, so it reaches ours.
    _upstream_main_body(config)


_hydra_main = hydra.main(config_path=_UPSTREAM_CONFIG_DIR, config_name="ppo_trainer", version_base=None)(run_with_config)


def _accept_trainer_cls_override(argv: list[str]) -> list[str]:
    """`trainer_cls=X` -> `++trainer_cls=X`: verl's config has no such key, Hydra would refuse to set it."""
    return [re.sub(rf"^(\+\+|\+)?{TRAINER_CLS_KEY}=", f"++{TRAINER_CLS_KEY}=", arg) for arg in argv]


def _config_path_from_cwd(argv: list[str]) -> list[str]:
    """A relative `--config-path`/`-cp` that names a folder under the working directory -> absolute.

    Hydra resolves a relative config path against the entry point's own file, which here lies in
    site-packages; recipe configs live in the working directory (the repo root).
    """
    out = list(argv)
    for i, arg in enumerate(out):
        for flag in ("--config-path", "-cp"):
            if arg == flag and i + 1 < len(out):
                out[i + 1] = _absolute_if_local_dir(out[i + 1])
            elif arg.startswith(flag + "="):
                out[i] = f"{flag}={_absolute_if_local_dir(arg[len(flag) + 1:])}"
    return out


def _absolute_if_local_dir(path: str) -> str:
    if "://" in path or os.path.isabs(path) or not os.path.isdir(path):
        return path
    return os.path.abspath(path)


def main() -> None:
    sys.argv = [sys.argv[0], *_config_path_from_cwd(_accept_trainer_cls_override(sys.argv[1:]))]
    _hydra_main()


if __name__ == "__main__":
    main()
