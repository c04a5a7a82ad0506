"""Two "nodes" on one host for multi-node tests: two network namespaces joined by a veth pair.

Each namespace has its own loopback and one private address on the pair (HEAD_IP, WORKER_IP), and
no route anywhere else: what runs inside can reach its own loopback and the other node, nothing
more. Per-namespace ``/etc/netns/<ns>/hosts`` maps this host's name to the node's address, so that
``hostname --ip-address`` (the SLURM script) and gloo (torch.distributed) see the node's address, as
on a real cluster. Needs root and iproute2; works inside CI's ``unshare -n`` too (named namespaces
live in /run/netns, not in the caller's network namespace).

SLURM stand-ins (``slurm_standin/srun``, ``scontrol``) run each step in its node's namespace, so
that ``examples/slurm/ray_on_slurm.slurm`` runs unchanged.

Ray's files go to a temp dir of the run's own (``RAY_TMPDIR=/tmp/atmn-<run>``), never /tmp/ray:
/tmp is shared by every namespace, and ``ray start --head`` records its address in
/tmp/ray/ray_current_cluster, which a later plain ``ray.init()`` on this host would join (a killed
head never removes it). Short, so that Ray's socket paths stay under the 107-byte AF_UNIX limit.

Teardown (also of a previous run that crashed, found by the fixed name prefix and its dead pid):
every process in the namespaces or tagged with the run's id is killed, then the namespaces, the
veth pair, the hosts files and the run's temp dir are removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

# Namespaces atmn-<pid><n>-h / -w, veth atmn<pid><n>h / w (n: a letter per run of this process):
# unique per run, and found again by name (and the dead pid) after a crash.
PREFIX = "atmn"
SUBNET = "10.213.7"  # private, unusual; exists only inside this run's two namespaces
HEAD_IP, WORKER_IP = f"{SUBNET}.1", f"{SUBNET}.2"
STANDIN_DIR = Path(__file__).resolve().parent / "slurm_standin"
RUN_TAG = "ATROPOS_MULTINODE_RUN"  # environment variable every process of a run carries
NODES_VAR = "ATROPOS_MULTINODE_NODES"  # "node=netns ..." for the srun stand-in
TMP_ROOT = Path("/tmp")
DEFAULT_RAY_ADDRESS_FILE = TMP_ROOT / "ray" / "ray_current_cluster"  # what a plain ray.init() reads


def run_tmp_dir(run_id: str) -> Path:
    return TMP_ROOT / f"{PREFIX}-{run_id}"


@dataclass(frozen=True)
class Node:
    name: str  # the SLURM node name
    netns: str
    ip: str

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run on this node: inside its network namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class TwoNodes:
    """Context manager: two namespaces joined by a veth pair, torn down on exit whatever happened."""

    _runs = 0

    def __init__(self):
        self.run_id = f"{os.getpid()}{chr(ord('a') + TwoNodes._runs % 26)}"
        TwoNodes._runs += 1
        self.head = Node("mn-head", f"{PREFIX}-{self.run_id}-h", HEAD_IP)
        self.worker = Node("mn-worker", f"{PREFIX}-{self.run_id}-w", WORKER_IP)
        self.veth = (f"{PREFIX}{self.run_id}h", f"{PREFIX}{self.run_id}w")
        self.tmp_dir = run_tmp_dir(self.run_id)  # RAY_TMPDIR of every process of the run

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.head, self.worker

    def __enter__(self) -> TwoNodes:
        cleanup_leftovers()
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _up(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # this pid's name: only a crashed run of ours
        self.tmp_dir.mkdir(mode=0o700)
        host_name = socket.gethostname()
        for node in self.nodes:
            _ip("netns", "add", node.netns)
            _ip("-n", node.netns, "link", "set", "lo", "up")
            hosts = Path("/etc/netns") / node.netns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(f"127.0.0.1 localhost\n{node.ip} {host_name} {node.name}\n")
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for node, dev in zip(self.nodes, self.veth):
            _ip("link", "set", dev, "netns", node.netns)
            _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", dev)
            _ip("-n", node.netns, "link", "set", dev, "up")

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for processes of this run: tagged, with the SLURM stand-ins first on PATH."""
        env = dict(os.environ)
        env[RUN_TAG] = self.run_id
        env[NODES_VAR] = " ".join(f"{n.name}={n.netns}" for n in self.nodes)
        env["PATH"] = os.pathsep.join([str(STANDIN_DIR), env.get("PATH", "")])
        env["RAY_TMPDIR"] = str(self.tmp_dir)
        env.update(extra)
        return env

    def set_link(self, up: bool) -> None:
        """Cut (or restore) the wire between the nodes: each keeps its address, nothing gets across."""
        for node, dev in zip(self.nodes, self.veth):
            _ip("-n", node.netns, "link", "set", dev, "up" if up else "down")

    def leftover_pids(self) -> list[int]:
        return sorted(_run_pids(self.run_id, [n.netns for n in self.nodes]))

    def down(self) -> None:
        _teardown(self.run_id, [n.netns for n in self.nodes], list(self.veth))


def _netns_pids(netns: str) -> set[int]:
    result = _ip("netns", "pids", netns, check=False)
    return {int(p) for p in result.stdout.split()} if result.returncode == 0 else set()


def _run_pids(run_id: str, namespaces: list[str]) -> set[int]:
    """Processes of a run: inside its namespaces, or carrying its tag (e.g. started outside them)."""
    pids = set().union(*(_netns_pids(ns) for ns in namespaces))
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(RUN_TAG) == run_id:
                pids.add(proc.pid)
        except (psutil.Error, OSError):
            continue
    pids.discard(os.getpid())
    return pids


def _kill_all(pids: set[int], grace_s: float = 5.0) -> None:
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _teardown(run_id: str, namespaces: list[str], veths: list[str]) -> None:
    # Twice: a process may fork while the first round kills its parent (Ray's raylet and workers).
    for _ in range(2):
        _kill_all(_run_pids(run_id, namespaces))
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)  # also removes the veth end inside it
        hosts_dir = Path("/etc/netns") / ns
        for f in hosts_dir.glob("*"):
            f.unlink()
        if hosts_dir.exists():
            hosts_dir.rmdir()
    for dev in veths:  # only if a crash left it in the creating namespace
        _ip("link", "del", dev, check=False)
    try:
        Path("/etc/netns").rmdir()  # only when empty (another run may be using it)
    except OSError:
        pass
    shutil.rmtree(run_tmp_dir(run_id), ignore_errors=True)


def cleanup_leftovers() -> None:
    """Tear down what a crashed earlier run left: namespaces named ``atmn-<pid>-*`` of a dead pid."""
    pattern = re.compile(rf"^{PREFIX}-((\d+)[a-z])-[hw]\b")
    dead: set[str] = set()
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = pattern.match(line)
        if match and not psutil.pid_exists(int(match.group(2))):
            dead.add(match.group(1))
    leftovers = [*Path("/etc/netns").glob(f"{PREFIX}-*"), *TMP_ROOT.glob(f"{PREFIX}-*")]
    for entry in leftovers:
        match = re.match(rf"^{PREFIX}-((\d+)[a-z])(-[hw])?$", entry.name)
        if match and not psutil.pid_exists(int(match.group(2))):
            dead.add(match.group(1))
    for run_id in dead:
        _teardown(run_id, [f"{PREFIX}-{run_id}-h", f"{PREFIX}-{run_id}-w"], [f"{PREFIX}{run_id}h", f"{PREFIX}{run_id}w"])


def namespaces_of_run(run_id: str) -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if f"-{run_id}-" in line]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
