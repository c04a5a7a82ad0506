"""Keys through the launcher: the trainer gets its keys through environment variables, never on its
command line or in its log; environments get the policy gateway's key through `{policy_api_key}`.

A key given on the launcher's command line (trainer.atropos.api_key=..., trainer.atropos.policy_api_key=...)
used to be copied onto the trainer's command line (visible in ps) and into trainer.log. The runs
here use the stand-in trainer and environment of the other launcher tests (real run-api, real
environment service); run under the loopback-only wrapper.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recipe.atropos.launcher.config import _local_searchpath_override, load_launcher_config
from recipe.atropos.launcher.plan import build_plan
from recipe.atropos.tests import test_launcher as evaluate
from recipe.atropos.tests import test_launcher_trajectory as trajectory
from recipe.atropos.tests.servers import find_free_loopback_port

POLICY_KEY = "pk-7f3a91c2e4b8d605"
SERVICE_KEY = "sk-25d0e6b9a1c47f38"


def all_text(run_dir: Path, *more: str) -> str:
    """Every log of the run folder, services.json and `more` (the launcher's console)."""
    return "".join(p.read_text(errors="replace") for p in sorted(run_dir.iterdir()) if p.is_file()) + "".join(more)


def trainer_overrides(argv: list[str]) -> list[str]:
    return argv[argv.index("--config-name") + 2 :]


# --------------------------------------------------------------------------------------------
# Trajectory mode: the policy gateway's key
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_policy_key_reaches_the_environment_and_stays_off_the_trainers_command_line_and_every_log(tmp_path):
    api_port, policy_port = find_free_loopback_port(), find_free_loopback_port()
    done = tmp_path / "done"
    environment = (
        "launcher.environments=[{name:stub,command:[python,-m,recipe.atropos.tests.launcher_traj_env,"
        "--policy,'{policy_base_url}',--openai.api_key,'{policy_api_key}'],env:{TRAJ_KEY:'{policy_api_key}'}}]"
    )
    run = trajectory.launch(
        tmp_path, trajectory.STUB_TRAINER, environment, *trajectory.FAST, "--console",
        f"trainer.atropos.policy_api_key={POLICY_KEY}",
        f"launcher.trajectory_api.port={api_port}", f"trainer.atropos.policy_gateway_port={policy_port}",
        env={"TRAJ_WAIT_FOR": str(done), "TRAJ_POLICY_DELAY_S": "0.2"},
    )
    try:
        run.wait_until(lambda: len(trajectory.env_starts(tmp_path)) == 1, "the environment", timeout_s=60)
        done.touch()
        assert run.wait(30) == 0, run.stderr()
    finally:
        if run.popen.poll() is None:
            run.popen.kill()
    # The environment got the key, on its command line and through its environment.
    started = trajectory.env_starts(tmp_path)[0]
    assert started["argv"][started["argv"].index("--openai.api_key") + 1] == POLICY_KEY
    assert started["env"]["TRAJ_KEY"] == POLICY_KEY
    # The trainer's command line has it nulled (the trainer reads $ATROPOS_POLICY_API_KEY instead).
    argv = trajectory.trainer_report(tmp_path)["argv"]
    assert POLICY_KEY not in " ".join(argv)
    assert "++trainer.atropos.policy_api_key=null" in trainer_overrides(argv)
    # No log, no state file, no console line shows it; the environment's log header masks it.
    assert POLICY_KEY not in all_text(run.run_dir, run.stdout(), run.stderr())
    assert "--openai.api_key '***'" in (run.run_dir / "env-stub.log").read_text()


@pytest.mark.timeout(60)
def test_dry_run_masks_a_policy_key_from_the_environment_and_gives_it_to_trainer_and_environments(tmp_path, monkeypatch):
    run = trajectory.launch(tmp_path, dry_run=True, env={"ATROPOS_POLICY_API_KEY": POLICY_KEY})
    assert run.wait(30) == 0, run.stderr()
    out = run.stdout()
    assert POLICY_KEY not in out + run.stderr()
    trainer_block, env_block = out.split("2. start trainer")[1].split("4. start env-gsm8k")
    assert "ATROPOS_POLICY_API_KEY='***'" in trainer_block and "ATROPOS_POLICY_API_KEY='***'" in env_block
    assert "--openai.api_key '***'" in env_block

    # What the launch would give each process.
    monkeypatch.setenv("ATROPOS_POLICY_API_KEY", POLICY_KEY)
    cfg = load_launcher_config(trajectory.CONFIG, [])
    plan = build_plan(cfg, trajectory.CONFIG, [], run_dir=tmp_path / "plan")
    assert plan.child_env(plan.trainer)["ATROPOS_POLICY_API_KEY"] == POLICY_KEY
    (env_spec,) = plan.environments
    assert env_spec.argv[env_spec.argv.index("--openai.api_key") + 1] == POLICY_KEY
    assert plan.child_env(env_spec)["ATROPOS_POLICY_API_KEY"] == POLICY_KEY


@pytest.mark.timeout(60)
def test_without_a_key_environments_get_EMPTY_and_a_gateway_beyond_loopback_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("ATROPOS_POLICY_API_KEY", raising=False)
    cfg = load_launcher_config(trajectory.CONFIG, [])
    (env_spec,) = build_plan(cfg, trajectory.CONFIG, [], run_dir=tmp_path / "plan", environ={}).environments
    assert env_spec.argv[env_spec.argv.index("--openai.api_key") + 1] == "EMPTY"
    assert "ATROPOS_POLICY_API_KEY" not in env_spec.env

    run = trajectory.launch(tmp_path, "trainer.atropos.policy_gateway_host=0.0.0.0", dry_run=True)
    assert run.wait(30) == 2, run.stderr()
    assert "trainer.atropos.policy_api_key" in run.stderr() and "ATROPOS_POLICY_API_KEY" in run.stderr()


@pytest.mark.timeout(60)
def test_the_trainer_composes_its_config_with_the_keys_nulled(tmp_path):
    """The overrides the launcher gives the trainer compose (Hydra's ++), and leave no key in the
    config verl prints."""
    from hydra import compose, initialize_config_dir

    overrides = [f"trainer.atropos.policy_api_key={POLICY_KEY}", f"launcher.environment.api_key={SERVICE_KEY}"]
    cfg = load_launcher_config(trajectory.CONFIG, overrides)
    plan = build_plan(cfg, trajectory.CONFIG, overrides, run_dir=tmp_path / "plan", environ={})
    passed = trainer_overrides(list(plan.trainer.argv))
    assert not any(POLICY_KEY in o or SERVICE_KEY in o for o in passed), passed
    searchpath = _local_searchpath_override(trajectory.CONFIG, [])  # verl's configs without importing verl
    with initialize_config_dir(config_dir=str(trajectory.CONFIG.parent), version_base=None):
        composed = compose(config_name=trajectory.CONFIG.stem, overrides=[*passed, *([searchpath] if searchpath else [])])
    assert composed.trainer.atropos.policy_api_key is None and composed.launcher.environment.api_key is None
    assert plan.child_env(plan.trainer)["ATROPOS_POLICY_API_KEY"] == POLICY_KEY


# --------------------------------------------------------------------------------------------
# Evaluate mode: the environment service's key
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_service_key_given_on_the_command_line_reaches_the_trainer_by_environment_only(tmp_path):
    env_port = find_free_loopback_port()
    launch = evaluate.run_launcher(
        tmp_path, f"launcher.environment.port={env_port}", evaluate.STUB_TRAINER, *evaluate.FAST, "--console",
        f"trainer.atropos.api_key={SERVICE_KEY}", f"launcher.environment.api_key={SERVICE_KEY}",
    )
    assert launch.popen.returncode == 0, launch.stderr()
    report = evaluate.trainer_report(tmp_path)
    assert report["health_status"] == 200
    assert SERVICE_KEY not in " ".join(report["argv"])
    assert {"++trainer.atropos.api_key=null", "++launcher.environment.api_key=null"} <= set(trainer_overrides(report["argv"]))
    assert SERVICE_KEY not in all_text(launch.run_dir, launch.stdout(), launch.stderr())

    (tmp_path / "dry").mkdir()
    dry = evaluate.run_launcher(tmp_path / "dry", "--dry-run", f"trainer.atropos.api_key={SERVICE_KEY}")
    assert dry.popen.returncode == 0, dry.stderr()
    assert SERVICE_KEY not in dry.stdout() and "ATROPOS_API_KEY='***'" in dry.stdout()
    cfg = load_launcher_config(evaluate.CONFIG, [f"trainer.atropos.api_key={SERVICE_KEY}"])
    plan = build_plan(cfg, evaluate.CONFIG, [f"trainer.atropos.api_key={SERVICE_KEY}"], run_dir=tmp_path / "p", environ={})
    assert plan.child_env(plan.trainer)["ATROPOS_API_KEY"] == SERVICE_KEY
