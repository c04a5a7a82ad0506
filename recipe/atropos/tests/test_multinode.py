"""Multi-node for real: two Ray nodes in two network namespaces on this host (``multinode.py``).

``examples/slurm/ray_on_slurm.slurm`` runs unchanged, with stand-in ``srun``/``scontrol`` that run
each step in its node's namespace; the batch script itself runs on the first node, as under SLURM.
What a user would check: the job trains 3 steps of the CPU config with ``trainer.nnodes=2``; Ray
itself places actor and rollout workers on both nodes; the environment service (evaluate mode), or
run-api and the Atropos environment (trajectory mode), run on the second node and are reached at
its address; workers on the second node run this repo's ``core_algos``; a node that cannot reach
the head stops the job with a message. Every test leaves no namespace and no process behind.

Needs root (``ip netns``); CI runs it inside ``unshare -n`` like every other Ray test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipe.atropos.tests.conftest import REPO_ROOT
from recipe.atropos.tests.multinode import (
    DEFAULT_RAY_ADDRESS_FILE,
    HEAD_IP,
    WORKER_IP,
    TwoNodes,
    namespaces_of_run,
    wait_for,
)


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2 (ip netns): CI runs as root"),
]

SLURM_SCRIPT = REPO_ROOT / "examples" / "slurm" / "ray_on_slurm.slurm"
CONFIG_DIR = REPO_ROOT / "recipe" / "atropos" / "config"
VENV_BIN = Path(sys.executable).parent
RAY_PORT = 6379
# Ray's logical CPUs per node (SLURM_CPUS_PER_TASK): the TaskRunner, one FSDP/rollout bundle, the
# agent-loop and reward workers. Logical only: real cores are whatever the processes use.
CPUS_PER_NODE = "4"
# The CPU config made as small as two FSDP ranks allow: 2 prompts x 4 answers = 4 sequences a rank.
LEAN = [
    "trainer.total_training_steps=3",
    # Joining the script's cluster: Ray refuses resource counts from a driver that connects.
    "ray_kwargs.ray_init.num_cpus=null",
    "ray_kwargs.ray_init.num_gpus=null",
    "data.train_batch_size=2",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
]


def _file_state(path: Path) -> tuple | None:
    try:
        return path.stat().st_mtime_ns, path.read_bytes()
    except FileNotFoundError:
        return None


@pytest.fixture
def nodes():
    address_file = _file_state(DEFAULT_RAY_ADDRESS_FILE)
    with TwoNodes() as net:
        yield net
    assert not namespaces_of_run(net.run_id), "a namespace of the run is left"
    assert not net.leftover_pids(), "a process of the run is left"
    assert not net.tmp_dir.exists(), "the run's Ray temp dir is left"
    assert not Path("/etc/netns", net.head.netns).exists() and not Path("/etc/netns", net.worker.netns).exists()
    # A head recorded there would be joined by every later plain ray.init() on this host.
    assert _file_state(DEFAULT_RAY_ADDRESS_FILE) == address_file, f"{DEFAULT_RAY_ADDRESS_FILE} was written by the run"


def _without_repo(pythonpath: str) -> str:
    return os.pathsep.join(p for p in pythonpath.split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT)


def job_env(net: TwoNodes, assets, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The job's environment as sbatch would give it, plus the CPU mode and the tiny assets.

    The repo root is taken off PYTHONPATH: the script must put it there itself, on every node."""
    env = net.env(
        SLURM_JOB_ID=f"mn{net.run_id}",
        SLURM_JOB_NODELIST=",".join(n.name for n in net.nodes),
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="1",
        SLURM_CPUS_PER_TASK=CPUS_PER_NODE,
        SLURM_SUBMIT_DIR=str(REPO_ROOT),
        PYTHON=sys.executable,
        RAY=str(VENV_BIN / "ray"),
        RAY_START_TIMEOUT_S="180",
        # Known to the test (the script would draw random ones) so that its probes can join.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        ATROPOS_ENV_API_KEY=secrets.token_hex(16),
        VERL_PLATFORM="cpu",
        VERL_CPU_MODEL_PATH=str(assets.model_dir),
        VERL_CPU_TRAIN_FILES=str(assets.train_file),
        VERL_CPU_VAL_FILES=str(assets.test_file),
        VERL_FILE_LOGGER_PATH=str(tmp_path / "metrics.jsonl"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PYTHONPATH"] = _without_repo(env.get("PYTHONPATH", ""))
    stand_ins, rest = env["PATH"].split(os.pathsep, 1)
    env["PATH"] = os.pathsep.join([stand_ins, str(VENV_BIN), rest])
    env.update(extra)
    return env


def probe_env(job: dict[str, str]) -> dict[str, str]:
    """For the test's own probes on the head node: the job's Ray token, this repo importable."""
    return {**job, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), job["PYTHONPATH"]]).rstrip(os.pathsep)}


def on_node(node_name: str, words: list[str]) -> str:
    """A launcher command (Hydra list) run on ``node_name`` through srun, as a user would write it."""
    srun = ["srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", node_name]
    words = [sys.executable if w == "python" else w for w in words]  # the launcher maps only a first `python`
    return "[" + ",".join(f"'{w}'" for w in srun + words) + "]"


def run_job(net: TwoNodes, env: dict[str, str], overrides: list[str], tmp_path: Path, timeout_s: float, during=None):
    """Run the SLURM script on the head node; meanwhile record Ray's view of the actors.

    ``during(actors_file, job)`` runs meanwhile (its probes end when the job does).
    Returns (exit code, the job's output, the actors Ray reported, what ``during`` returned)."""
    log = tmp_path / "job.log"
    actors = tmp_path / "actors.json"
    started = time.monotonic()
    with open(log, "w") as out:
        job = subprocess.Popen(net.head.wrap(["bash", str(SLURM_SCRIPT), *overrides]), env=env, cwd=REPO_ROOT,
                               stdout=out, stderr=subprocess.STDOUT)
        observer = subprocess.Popen(
            net.head.wrap([sys.executable, "-m", "recipe.atropos.tests.multinode_probe", "observe",
                           "--address", f"{HEAD_IP}:{RAY_PORT}", "--out", str(actors)]),
            env=probe_env(env), cwd="/", stdout=subprocess.DEVNULL, stderr=open(tmp_path / "observer.log", "w"),
        )
        try:
            seen = during(actors, job) if during else None
            code = job.wait(max(1.0, timeout_s - (time.monotonic() - started)))
        finally:
            for proc in (observer, job):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"two-node job: exit code {code} after {time.monotonic() - started:.0f} s")
    recorded = json.loads(actors.read_text()) if actors.exists() else {"actors": []}
    return code, log.read_text(), recorded["actors"], seen


def run_probe(argv: list[str], env: dict[str, str], timeout_s: float, job: subprocess.Popen | None = None) -> str:
    """Run a probe to the end and return its stdout; if ``job`` ends first, stop and say so."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        probe = subprocess.Popen(argv, env=env, cwd="/", stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        while probe.poll() is None:
            if (job is not None and job.poll() is not None) or time.monotonic() > deadline:
                probe.kill()
                probe.wait()
                raise AssertionError(f"{argv[3:6]}: the job ended (code {job.poll() if job else None}) or "
                                     f"{timeout_s} s passed before the probe did")
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        stdout = out.read()
        assert probe.returncode == 0, stdout + err.read()
        return stdout


def core_algos_on_worker(net: TwoNodes, env: dict[str, str], working_dir: Path | None = None, job=None) -> dict:
    """Which core_algos a Ray task pinned to the worker node imports (a driver on the head node).

    The driver runs from / : Ray puts the driver's working directory on its workers' sys.path, which
    would hide a worker node started without the repo on its own path."""
    argv = [sys.executable, "-m", "recipe.atropos.tests.multinode_probe", "core-algos",
            "--address", f"{HEAD_IP}:{RAY_PORT}", "--node-ip", WORKER_IP]
    if working_dir is not None:
        argv += ["--working-dir", str(working_dir)]
    return json.loads(run_probe(net.head.wrap(argv), probe_env(env), 300, job).strip().splitlines()[-1])


def _wait_for_both_nodes(actors_file: Path, job: subprocess.Popen) -> None:
    def both_nodes():
        assert job.poll() is None, f"the job ended (code {job.returncode}) before Ray reported two nodes"
        try:
            return len(json.loads(actors_file.read_text())["nodes"]) >= 2
        except (OSError, ValueError):
            return False

    wait_for(both_nodes, 240, 2.0, "Ray to report two nodes")


def steps_and_metrics(metrics_file: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [row.get("data", row) for row in rows]


def node_ips_of(actors: list[dict], class_name: str) -> list[str]:
    # verl's colocated workers report as "create_colocated_worker_cls.<locals>.WorkerDict".
    return sorted(a["node_ip"] for a in actors if a["class_name"].rsplit(".", 1)[-1] == class_name)


REPO_CORE_ALGOS = str(REPO_ROOT / "verl" / "trainer" / "ppo" / "core_algos.py")
OVERRIDE_APPLIED = [[0.25] * 3] * 4


def _assert_workers_on_both_nodes(actors: list[dict]) -> None:
    # verl's FSDP workers (actor + rollout, one rank a node) and the HF rollout server beside each.
    assert node_ips_of(actors, "WorkerDict") == [HEAD_IP, WORKER_IP], actors
    assert node_ips_of(actors, "HFRolloutServer") == [HEAD_IP, WORKER_IP], actors
    # The trainer's loop stays on the node it was started on (the launcher's): its gateway is there.
    assert node_ips_of(actors, "TaskRunner") == [HEAD_IP], actors


@pytest.mark.timeout(60)
def test_two_namespaces_reach_each_other_over_the_pair_only(nodes):
    routes = {n.netns: subprocess.run(["ip", "-n", n.netns, "route"], capture_output=True, text=True).stdout for n in nodes.nodes}
    assert all(r.split() and r.split()[0] == "10.213.7.0/24" and "default" not in r for r in routes.values()), routes
    server = subprocess.Popen(nodes.worker.wrap([sys.executable, "-m", "http.server", "--bind", WORKER_IP, "8765"]),
                              env=nodes.env(), cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://{WORKER_IP}:8765/', timeout=5).status)"
    got = wait_for(lambda: subprocess.run(nodes.head.wrap([sys.executable, "-c", fetch]), capture_output=True, text=True).stdout.strip(),
                   20, 0.5, "the worker node's server to answer the head node")
    assert got == "200"
    resolved = subprocess.run(nodes.worker.wrap(["hostname", "--ip-address"]), capture_output=True, text=True).stdout.split()
    assert resolved == [WORKER_IP], "hostname resolves to the node's own address, as the SLURM script expects"
    server.terminate()
    server.wait(10)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_slurm_script_trains_on_two_nodes_with_the_environment_service_on_the_second(nodes, tiny_assets, tmp_path):
    env = job_env(nodes, tiny_assets, tmp_path, CONFIG="recipe/atropos/config/gsm8k_grpo_cpu.yaml", ENV_HOST=WORKER_IP)
    service = ["python", "-m", "recipe.atropos.environments.gsm8k_server", "serve", "--slurm", "false",
               "--host", "{host}", "--port", "{port}", "--env.token_level", "true"]
    overrides = [*LEAN, "data.max_response_length=16", f"launcher.run_dir={tmp_path / 'run'}",
                 f"launcher.environment.command={on_node('mn-worker', service)}"]

    address_file = nodes.tmp_dir / "ray" / "ray_current_cluster"  # the job's RAY_TMPDIR

    def while_training(actors_file: Path, job: subprocess.Popen) -> tuple[dict, dict]:
        _wait_for_both_nodes(actors_file, job)
        assert address_file.read_text() == f"{HEAD_IP}:{RAY_PORT}", "ray start --head records its address"
        # From the head node (where the trainer's loop is), at the worker node's address.
        service_auth = auth_answers(nodes.head, env, f"http://{WORKER_IP}:9001", "POST",
                                    "/evaluate_and_compute_advantages", env["ATROPOS_ENV_API_KEY"], job)
        return core_algos_on_worker(nodes, env, job=job), service_auth

    code, output, actors, (worker_core_algos, service_auth) = run_job(nodes, env, overrides, tmp_path, 840,
                                                                      during=while_training)
    assert code == 0, output[-6000:]
    # The script's exit took it away: a later plain ray.init() on the node starts its own Ray.
    assert not address_file.exists()
    steps = steps_and_metrics(tmp_path / "metrics.jsonl")
    assert [m["training/global_step"] for m in steps] == [1, 2, 3]
    # Every step's advantages came from the service on the second node (no fallback to plain GRPO).
    assert all(m["atropos/fallback"] == 0.0 and m["atropos/env/num_groups"] == 2.0 for m in steps), steps
    service_log = (tmp_path / "run" / "environment.log").read_text()
    assert f"serving 'gsm8k' on http://{WORKER_IP}:9001" in service_log
    # The service on the worker node takes only the job's key (ATROPOS_ENV_API_KEY, from the script):
    # keyless 401; with the key, the empty request reaches the service, which refuses its shape.
    assert (service_auth["health"], service_auth["keyless"]) == (200, 401), service_auth
    assert service_auth["keyed"] not in (401, 403), service_auth
    _assert_workers_on_both_nodes(actors)
    # Workers on the second node import this repo's core_algos (PYTHONPATH exported by the script).
    assert worker_core_algos["node_ip"] == WORKER_IP
    assert worker_core_algos["core_algos_file"] == REPO_CORE_ALGOS
    assert worker_core_algos["override"] == OVERRIDE_APPLIED


def _trajectory_environments(policy_key: str) -> str:
    """The CPU trajectory config's environment, run on the worker node with the gateway's key."""
    raw = OmegaConf.load(CONFIG_DIR / "gsm8k_trajectory_cpu.yaml").launcher.environments[0]
    words = list(OmegaConf.to_container(raw.command, resolve=False))
    words[words.index("--openai.api_key") + 1] = policy_key
    return f"launcher.environments=[{{name:{raw.name},command:{on_node('mn-worker', words)},env:{{WANDB_MODE:disabled}}}}]"


def auth_answers(node, env: dict[str, str], base_url: str, method: str, path: str, key: str, job) -> dict:
    """From ``node``, once ``base_url``/health answers 200: ``method path`` without a key, then with it.

    Returns the status codes (``health``, ``keyless``, ``keyed``) and the /health answer (``status``)."""
    code = (
        "import json, requests, sys, time\n"
        "base, method, path, key = sys.argv[1:5]\n"
        "deadline = time.monotonic() + 600\n"
        "health = None\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        "        health = requests.get(base + '/health', timeout=5)\n"
        "        if health.status_code == 200: break\n"
        "    except requests.RequestException: pass\n"
        "    time.sleep(1)\n"
        "ask = lambda **kw: requests.request(method, base + path, json={}, timeout=30, **kw).status_code\n"
        "print(json.dumps({'health': health.status_code, 'status': health.json(), 'keyless': ask(),\n"
        "                  'keyed': ask(headers={'Authorization': 'Bearer ' + key})}))\n"
    )
    out = run_probe(node.wrap([sys.executable, "-c", code, base_url, method, path, key]), env, 660, job)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_slurm_script_trajectory_mode_environment_on_the_second_node_through_the_head_gateway(nodes, tiny_assets, tmp_path):
    policy_key = secrets.token_hex(16)
    env = job_env(nodes, tiny_assets, tmp_path, CONFIG="recipe/atropos/config/gsm8k_trajectory_cpu.yaml")
    run_api = ["python", "-m", "atroposlib.cli.run_api", "--host", "{host}", "--port", "{port}"]
    overrides = [
        *LEAN,
        f"launcher.run_dir={tmp_path / 'run'}",
        # The gateway on the head node, reachable from the other: every interface, with a key.
        "trainer.atropos.policy_gateway_host=0.0.0.0",
        f"trainer.atropos.policy_api_key={policy_key}",
        f"launcher.policy_endpoint.base_url=http://{HEAD_IP}:8001/v1",
        # The rollout servers on both nodes, reachable from the gateway.
        "actor_rollout_ref.rollout.engine_kwargs.hf.host=0.0.0.0",
        f"launcher.trajectory_api.host={WORKER_IP}",
        f"launcher.trajectory_api.command={on_node('mn-worker', run_api)}",
        _trajectory_environments(policy_key),
    ]
    # From the worker node, where the environment is: the gateway answers only with its key.
    code, output, actors, gateway_auth = run_job(
        nodes, env, overrides, tmp_path, 840,
        during=lambda _, job: auth_answers(nodes.worker, env, f"http://{HEAD_IP}:8001", "GET", "/v1/models", policy_key, job),
    )
    assert code == 0, output[-6000:]
    steps = steps_and_metrics(tmp_path / "metrics.jsonl")
    assert [m["training/global_step"] for m in steps] == [1, 2, 3]
    # Every step's batch came from run-api on the worker node, filled by the environment there.
    assert all(m["atropos/batch_groups"] == 2.0 and m["atropos/fallback"] == 0.0 for m in steps), steps
    run_dir = tmp_path / "run"
    assert f"Uvicorn running on http://{WORKER_IP}:8000" in (run_dir / "run-api.log").read_text()
    env_log = (run_dir / "env-gsm8k.log").read_text()
    assert f"--openai.base_url http://{HEAD_IP}:8001/v1" in env_log.splitlines()[0], env_log[:2000]
    assert "Traceback" not in env_log, env_log[-3000:]
    _assert_workers_on_both_nodes(actors)
    # The gateway bound beyond loopback answers the worker node only with its key, and it forwards
    # to the HF rollout servers of both nodes, at their node addresses.
    assert [gateway_auth[k] for k in ("health", "keyless", "keyed")] == [200, 401, 200], gateway_auth
    servers = sorted(url.split("//", 1)[1].rsplit(":", 1)[0] for url in gateway_auth["status"]["servers"])
    assert servers == [HEAD_IP, WORKER_IP], gateway_auth


def start_ray_nodes(net: TwoNodes, head_env: dict[str, str], worker_env: dict[str, str], worker_cwd: str) -> list[subprocess.Popen]:
    """The SLURM script's two `ray start` commands, each on its node (torn down with the namespaces)."""
    resources = ["--num-gpus", "1", "--num-cpus", "1"]
    ray = str(VENV_BIN / "ray")
    head = [ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={RAY_PORT}", *resources, "--disable-usage-stats", "--block"]
    worker = [ray, "start", f"--address={HEAD_IP}:{RAY_PORT}", *resources, "--disable-usage-stats", "--block"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen(net.head.wrap(head), env=head_env, cwd=REPO_ROOT, **quiet)]
    procs.append(subprocess.Popen(net.worker.wrap(worker), env=worker_env, cwd=worker_cwd, **quiet))
    wait = [sys.executable, "examples/slurm/wait_for_ray_nodes.py", "--address", f"{HEAD_IP}:{RAY_PORT}", "--nodes", "2", "--timeout", "180"]
    result = subprocess.run(net.head.wrap(wait), env=head_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout + result.stderr
    return procs


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_worker_node_runs_the_repo_core_algos_only_with_the_repo_on_its_path_or_shipped_as_working_dir(nodes, tiny_assets, tmp_path):
    """A node without the checkout on its path (a node that does not share the file system) runs
    the installed core_algos, silently: this is what the check in the two-node training run would
    catch. Ray's runtime_env working_dir ships the repo to it, overlay first on its path."""
    job = job_env(nodes, tiny_assets, tmp_path)
    head_env = {**job, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), job["PYTHONPATH"]]).rstrip(os.pathsep)}
    start_ray_nodes(nodes, head_env, worker_env=job, worker_cwd="/")

    bare = core_algos_on_worker(nodes, job)
    assert bare["node_ip"] == WORKER_IP
    assert "site-packages" in bare["core_algos_file"] and bare["core_algos_file"] != REPO_CORE_ALGOS
    assert bare["override"].startswith("TypeError"), "the installed GRPO takes no token-level override"

    shipped = core_algos_on_worker(nodes, job, working_dir=REPO_ROOT)
    assert shipped["node_ip"] == WORKER_IP
    assert "runtime_resources" in shipped["core_algos_file"] and shipped["core_algos_file"].endswith("verl/trainer/ppo/core_algos.py")
    assert shipped["registry_grpo_file"] == shipped["core_algos_file"]
    assert shipped["override"] == OVERRIDE_APPLIED


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_slurm_script_stops_when_a_node_cannot_reach_the_head(nodes, tiny_assets, tmp_path):
    nodes.set_link(up=False)  # both nodes up, nothing gets across (a firewall, a wrong interface)
    env = job_env(nodes, tiny_assets, tmp_path, CONFIG="recipe/atropos/config/gsm8k_grpo_cpu.yaml", RAY_START_TIMEOUT_S="20")
    code, output, _, _ = run_job(nodes, env, LEAN, tmp_path, 240)
    assert code == 1, output[-4000:]
    assert "wait_for_ray_nodes: timed out after 20 s: 1 of 2 node(s) alive" in output
    assert f"Failed to connect to GCS at address {HEAD_IP}:{RAY_PORT}" in output, "what the worker node says"
    assert "launcher" not in output.split("timed out after", 1)[1], "nothing may start on a partial cluster"
