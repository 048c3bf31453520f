"""The scheduler process killed (SIGKILL) and started again at the same address.

Real processes as an operator starts them: ``dask scheduler --preload warmserve.scheduler_plugin``
and ``dask worker ... --preload warmserve.worker_plugin`` (with its nanny), and the front door on
uvicorn at 127.0.0.1 in a thread of this process. While the scheduler is away the front door
answers 503 with Retry-After at once; once it is back, the worker (restarted by its nanny) and
the front door (a new Dask client) connect again, and a request is served.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import dask.config
import httpx
import pytest
import uvicorn
from distributed import Client

from warmserve.frontdoor.app import create_app
from warmserve.registry import Registry
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

DASK = os.path.join(os.path.dirname(sys.executable), "dask")
POLLS = 1200  # at 0.1 s: every wait below is bounded in count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FrontDoor:
    """The front door on uvicorn in a thread with its own event loop, as its own process."""

    def __init__(self, scheduler: str, registry: Registry) -> None:
        app = create_app(scheduler, registry, retry_after=3)
        self.door = app.state.door
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
        )
        self.url = f"http://127.0.0.1:{self.server.config.port}"
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        for _ in range(POLLS):
            if self.server.started:
                return
            self._thread.join(0.1)
        raise AssertionError("the front door did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join()


def scheduler(port: int, registry_file: str, *flags: str) -> subprocess.Popen:
    """``dask scheduler`` with the preload; ``flags`` are more of its flags (a config YAML)."""
    return subprocess.Popen(
        [
            *(DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
            *("--preload", "warmserve.scheduler_plugin", "--warmserve-registry", registry_file),
            *flags,
        ]
    )


def worker(address: str, registry_file: str) -> subprocess.Popen:
    """``dask worker`` (with its nanny) on one CPU slot; it outlives a lost scheduler."""
    return subprocess.Popen(
        [
            *(DASK, "worker", address, "--nthreads", "1", "--memory-limit", "0", "--no-dashboard"),
            *("--preload", "warmserve.worker_plugin", "--warmserve-devices", "cpu:0"),
            *("--warmserve-registry", registry_file),
        ],
        env={**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"},
    )


def poll(check, what: str) -> None:
    for _ in range(POLLS):
        if check():
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"never: {what}")


def listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def stop(door: FrontDoor | None, nanny: subprocess.Popen, procs: list[subprocess.Popen]) -> None:
    """End a test's stack as an operator would: the front door, then the worker (its nanny,
    which may take a while to close its worker), then the schedulers."""
    if door is not None:
        door.stop()
    nanny.send_signal(signal.SIGTERM)
    nanny.wait(120)
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(60)


def health(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError:
        return None


def test_scheduler_restart(tiny_registry, models_dir):
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        restart(tiny_registry, models_dir)


def restart(tiny_registry: Registry, models_dir: str) -> None:
    registry_file = os.path.join(models_dir, "registry.yaml")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [scheduler(port, registry_file)]
    nanny = worker(address, registry_file)
    door = None
    try:
        poll(lambda: listens(port), "the scheduler listens")
        door = FrontDoor(address, tiny_registry)
        door.start()
        body = {"model": "tiny-0", "prompt": "restart", "max_tokens": 3}
        r = httpx.post(f"{door.url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text

        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        poll(lambda: (h := health(door.url)) is not None and h.status_code == 503, "503")
        r = httpx.post(f"{door.url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == 503
        # Longer away than the Dask client's reconnect window: it gives up, the door does not.
        poll(lambda: door.door.client.status == "closed", "the first client gave up")

        procs.append(scheduler(port, registry_file))
        poll(lambda: (h := health(door.url)) is not None and h.status_code == 200, "reconnect")
        with Client(address, timeout="30s") as client:
            proxy = WarmServeProxy(client)

            def worker_back() -> bool:
                return any(d["worker"] for d in proxy.status()["devices"])

            poll(worker_back, "the worker's device registered with the new scheduler")
        r = httpx.post(f"{door.url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert nanny.poll() is None  # the same `dask worker` (its nanny) throughout
    finally:
        stop(door, nanny, procs)
