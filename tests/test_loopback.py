"""The preloaded scheduler's HTTP server (dashboard, WarmServe page, /metrics) listens on
127.0.0.1 when Dask would put it on every interface, unless ``--warmserve-public-dashboard``;
``warmserve up`` keeps its dashboard on 127.0.0.1 unless ``--dashboard-address`` says where."""

from __future__ import annotations

import asyncio
import os
import socket

import dask.config
import httpx
from distributed import Scheduler
from distributed.comm.utils import get_tcp_server_addresses
from distributed.utils import get_ip

from warmserve.launcher import DASHBOARD, cluster_spec
from warmserve.registry import Registry


async def listening_hosts(registry_file: str, *flags: str) -> tuple[set[str], int, list[int]]:
    """Where a scheduler started with Dask's default dashboard address (every interface) and
    the preload listens for HTTP, its port, and the statuses of its pages on 127.0.0.1."""
    async with Scheduler(
        host="127.0.0.1",
        port=0,
        dashboard_address=":0",
        preload=["warmserve.scheduler_plugin"],
        preload_argv=[["--warmserve-registry", registry_file, *flags]],
    ) as scheduler:
        server = scheduler.http_server
        hosts = {host for host, *_ in get_tcp_server_addresses(server)}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            pages = [(await http.get(path)).status_code for path in ("/warmserve", "/metrics")]
        return hosts, server.port, pages


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return False
    return True


def test_scheduler_dashboard_stays_on_loopback(tiny_registry: Registry, models_dir: str):
    registry_file = os.path.join(models_dir, "registry.yaml")
    with dask.config.set({"warmserve.public-dashboard": False}):  # the flag sets it for good
        local = asyncio.run(listening_hosts(registry_file))
        public = asyncio.run(listening_hosts(registry_file, "--warmserve-public-dashboard"))
    hosts, port, pages = local
    assert hosts == {"127.0.0.1"} and pages == [200, 200]
    assert public[0] == {"0.0.0.0"} and public[2] == [200, 200]
    outside = get_ip()  # this machine's address towards the network
    if not outside.startswith("127."):
        assert not reachable(outside, port)


def test_up_dashboard_defaults_to_loopback():
    scheduler, _ = cluster_spec("registry.yaml", "warmserve", ["cpu:0"])
    assert scheduler["options"]["dashboard_address"] == DASHBOARD == "127.0.0.1:0"
    assert "--warmserve-public-dashboard" not in scheduler["options"]["preload_argv"][0]
    opened, _ = cluster_spec("registry.yaml", "warmserve", ["cpu:0"], ":8787")
    assert opened["options"]["dashboard_address"] == ":8787"
    assert "--warmserve-public-dashboard" in opened["options"]["preload_argv"][0]
