"""torch.distributed rendezvous whose store listens on MASTER_ADDR only, not on every interface.

verl's workers join their process group with ``init_method=$DIST_INIT_METHOD`` (default
``env://``). torch's ``env://`` starts the group's TCPStore server in the rank-0 worker on
MASTER_PORT bound to every interface (``*:<port>``), whatever MASTER_ADDR says: on a shared machine
anyone who can reach it may write the store's keys while the workers rendezvous. torch's TCPStore
accepts a socket the caller bound instead (``master_listen_fd``, through verl's own
``create_tcp_store``), and torch lets a program register its own rendezvous scheme; verl reads
the scheme from DIST_INIT_METHOD. So:

    VERL_USE_EXTERNAL_MODULES=recipe.atropos.rendezvous DIST_INIT_METHOD=atropos-env://

(the launcher sets both for the trainer; verl imports the module in every process, its Ray
workers included) gives ``env://`` with the server bound to MASTER_ADDR (verl sets it to the
rank-0 worker's node address: 127.0.0.1 on a machine whose Ray runs on loopback). Ranks, world
size and port are read as ``env://`` reads them.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

from torch.distributed.rendezvous import register_rendezvous_handler

SCHEME = "atropos-env"
INIT_METHOD = f"{SCHEME}://"
_DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch's default for a process group's store


def _from_url_or_env(query: dict[str, list[str]], key: str, variable: str) -> int:
    if key in query:
        return int(query[key][0])
    if variable not in os.environ:
        raise ValueError(f"{INIT_METHOD} rendezvous: {variable} is not set (and the URL names no {key})")
    return int(os.environ[variable])


def listen_on(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host` (an address or a name) and `port` only."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address[:2], family=family, backlog=socket.SOMAXCONN)


def bound_env_rendezvous(url: str, timeout: timedelta = _DEFAULT_TIMEOUT, **_kwargs):
    """torch rendezvous handler: ``env://`` whose rank-0 store listens on MASTER_ADDR only."""
    from verl.utils.distributed import create_tcp_store

    query = parse_qs(urlsplit(url).query)
    rank = _from_url_or_env(query, "rank", "RANK")
    world_size = _from_url_or_env(query, "world_size", "WORLD_SIZE")
    host = os.environ["MASTER_ADDR"].strip("[]")
    port = int(os.environ["MASTER_PORT"])
    listener = listen_on(host, port) if rank == 0 else None
    store = create_tcp_store(host, port, listen_socket=listener, world_size=world_size, is_master=rank == 0,
                             timeout=timeout)
    yield store, rank, world_size


def register() -> None:
    """Register the scheme with torch (once per process; importing this module does it)."""
    try:
        register_rendezvous_handler(SCHEME, bound_env_rendezvous)
    except RuntimeError:  # already registered in this process
        pass


register()
