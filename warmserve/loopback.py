"""The HTTP server of a preloaded scheduler or worker (Dask's dashboard, the WarmServe page,
``/metrics``) listens on 127.0.0.1 unless ``warmserve.public-dashboard`` says otherwise.

``dask scheduler`` listens for it on every interface by default (``--dashboard-address :8787``),
``dask worker`` too (``:0``), and a preload cannot change the address before the server starts:
``Scheduler.__init__`` and ``Worker.start`` open it before the preload's ``dask_setup`` runs. So
``dask_setup`` moves it: a server on every interface is stopped and the same application listens
again on 127.0.0.1 at the same port, before the scheduler serves anyone else (its plugins start
after the preload) and before the worker registers (the scheduler learns the port from it). An
address the operator gave with a host (``--dashboard-address 10.0.0.5:8787``) is left alone.
"""

from __future__ import annotations

import logging

from distributed.comm.utils import get_tcp_server_addresses
from distributed.node import ServerNode
from tornado.httpserver import HTTPServer

from warmserve import config

logger = logging.getLogger("warmserve.loopback")

LOOPBACK = "127.0.0.1"
EVERY_INTERFACE = ("0.0.0.0", "::")


def keep_http_local(node: ServerNode) -> None:
    """Move ``node``'s HTTP server from every interface to 127.0.0.1, unless it is public."""
    server = node.http_server
    hosts = {host for host, *_ in get_tcp_server_addresses(server)}
    if config.get("public-dashboard") or not hosts & set(EVERY_INTERFACE):
        return
    port = server.port
    server.stop()
    local = HTTPServer(node.http_application, ssl_options=server.ssl_options)
    local.listen(port, address=LOOPBACK)
    local.address, local.port = LOOPBACK, port
    node.http_server = node.services["dashboard"] = local
    logger.info(
        "dashboard and /metrics on %s:%d only (--warmserve-public-dashboard: every interface)",
        LOOPBACK,
        port,
    )
