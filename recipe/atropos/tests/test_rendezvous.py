"""The workers' rendezvous store listens on MASTER_ADDR only (recipe/atropos/rendezvous.py).

torch's env:// starts the store of a process group in rank 0 bound to every interface, whatever
MASTER_ADDR says; that was the one socket of a launcher run open beyond loopback. Two real gloo
ranks here, as verl's workers join (DIST_INIT_METHOD); run under the loopback-only wrapper.
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from recipe.atropos.tests.conftest import REPO_ROOT, repo_env
from recipe.atropos.tests.servers import find_free_loopback_port

WILDCARDS = ("0.0.0.0", "::", "")

RANK = """
import datetime, json, os, sys, torch, torch.distributed as dist
from verl.utils.distributed import initialize_global_process_group_ray  # as verl's workers join
initialize_global_process_group_ray(timeout_second=60, backend="gloo")
t = torch.ones(2) * (dist.get_rank() + 1)
dist.all_reduce(t)
print(json.dumps({"rank": dist.get_rank(), "sum": t.tolist()}), flush=True)
sys.stdin.read()  # stay until the test has looked at the sockets
"""


def wildcard_listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket of `pids` listening on all interfaces."""
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip in WILDCARDS]


def listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("init_method", ["atropos-env://", None])
def test_rank_zero_store_listens_on_master_addr_only(init_method):
    port = find_free_loopback_port()
    env = repo_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                   VERL_USE_EXTERNAL_MODULES="recipe.atropos.rendezvous")
    if init_method:
        env["DIST_INIT_METHOD"] = init_method
    ranks = [subprocess.Popen([sys.executable, "-c", RANK], env={**env, "RANK": str(r)}, cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        answers = [p.stdout.readline() for p in ranks]
        assert all('"sum": [3.0, 3.0]' in a for a in answers), answers
        pids = {p.pid for p in ranks}
        store = [entry for entry in listeners(pids) if entry[2] == port]
        assert store, "no store listening on MASTER_PORT"
        if init_method:
            assert store == [(ranks[0].pid, "127.0.0.1", port)]
            assert wildcard_listeners(pids) == []
        else:  # torch's own env://, the reason for the scheme
            assert store[0][1] in WILDCARDS
    finally:
        for p in ranks:
            p.communicate(timeout=30)
