"""The README's "Deploy on a cluster", command for command, on CPU slots and generated models.

Each command runs as an operator runs it, in its own terminal session: ``dask scheduler`` with
the scheduler preload, one ``dask worker`` with the worker preload, ``warmserve frontdoor``. A
completion goes through the front door over HTTP, the dashboard serves the WarmServe page, and
Ctrl-C (SIGINT to each session) stops each command cleanly: exit status 0, no traceback, no
worker killed by its nanny. The same runs over TLS with certificates made in the test, where a
client without the cluster's certificate is refused. Waits are on readiness, with a generous
deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dask.config
import httpx
import pytest
from distributed.utils import get_ip

from tests.certs import make_certs, no_certificate, refused
from tests.test_restart_scheduler import listens
from warmserve.dashboard.view import ClusterView
from warmserve.registry import Registry
from warmserve.status import StatusError, fetch

pytestmark = pytest.mark.engine

BIN = os.path.dirname(sys.executable)
DEADLINE = 600.0  # seconds any wait may take on a loaded 2-core machine

Start = Callable[..., subprocess.Popen]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start a command of the README in its own session, its output in ``<name>.log``."""
    procs: list[subprocess.Popen] = []

    def run(name: str, *argv: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                [os.path.join(BIN, argv[0]), *argv[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield run
    for proc in procs:  # only left running when the test failed
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(ready: Callable[[], bool], what: str, *procs: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ready():
        assert all(p.poll() is None for p in procs), f"a command ended before {what}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def has_worker(address: str) -> bool:
    try:
        view = ClusterView.from_dict(asyncio.run(fetch(address, 5.0))["view"])
    except StatusError:
        return False
    return any(d.worker for d in view.devices)


def ctrl_c(proc: subprocess.Popen) -> int:
    """SIGINT to the command's session, as Ctrl-C in its terminal; its exit status."""
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(DEADLINE)


def test_deploy_on_a_cluster(tmp_path: Path, start: Start, tiny_registry: Registry, models_dir):
    registry = os.path.join(models_dir, "registry.yaml")
    port, dashboard, door_port = free_port(), free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start(
        "scheduler",
        *("dask", "scheduler", "--host", "127.0.0.1", "--port", str(port)),
        *("--dashboard-address", f":{dashboard}"),  # Dask's form for every interface
        *("--preload", "warmserve.scheduler_plugin", "--warmserve-registry", registry),
    )
    worker = start(
        "worker",
        *("dask", "worker", address, "--nthreads", "1", "--memory-limit", "0"),
        *("--preload", "warmserve.worker_plugin", "--warmserve-devices", "cpu:0"),
        *("--warmserve-registry", registry),
    )
    door = start(
        "frontdoor",
        *("warmserve", "frontdoor", "--scheduler", address),
        *("--host", "127.0.0.1", "--port", str(door_port), "--registry", registry),
    )
    url = f"http://127.0.0.1:{door_port}"
    wait_until(lambda: has_worker(address), "the worker's device registers", scheduler, worker)
    wait_until(lambda: answers(f"{url}/health"), "the front door serves", door)

    body = {"model": "tiny-0", "prompt": "Deploy", "max_tokens": 4, "temperature": 0.0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=DEADLINE)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert answers(f"http://127.0.0.1:{dashboard}/warmserve")
    outside = get_ip()  # this machine's address towards the network
    if not outside.startswith("127."):  # the preload moved the dashboard to 127.0.0.1
        assert not answers(f"http://{outside}:{dashboard}/warmserve")
    status = subprocess.run(
        [os.path.join(BIN, "warmserve"), "status", "--scheduler", address],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert status.returncode == 0 and "/cpu:0" in status.stdout, status.stdout + status.stderr

    for proc in (door, worker, scheduler):
        assert ctrl_c(proc) == 0
    for name in ("scheduler", "worker", "frontdoor"):
        log = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in log, log
        assert "killing" not in log, log


def test_frontdoor_needs_the_scheduler_plugin(start: Start, tiny_registry: Registry, models_dir):
    """A scheduler started without the preload gets one line, not a door that answers 503."""
    port = free_port()
    scheduler = start(
        "plain-scheduler", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port)
    )
    address = f"tcp://127.0.0.1:{port}"
    wait_until(lambda: listens(port), "the scheduler listens", scheduler)
    registry = os.path.join(models_dir, "registry.yaml")
    door = subprocess.run(
        [os.path.join(BIN, "warmserve"), "frontdoor", "--scheduler", address],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env={**os.environ, "DASK_WARMSERVE__MODELS_DIR": os.path.dirname(registry)},
    )
    assert door.returncode != 0
    assert door.stderr.strip().splitlines() == [
        f"Error: the scheduler at {address} has no WarmServe plugin "
        "(start it with --preload warmserve.scheduler_plugin)"
    ], door.stderr


def status(address: str, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(BIN, "warmserve"), "status", "--scheduler", address, "--timeout", "3", *tls],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def test_deploy_over_tls(tmp_path: Path, start: Start, tiny_registry: Registry, models_dir):
    ca, cert, key = make_certs(tmp_path, "cluster")
    tls = ("--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key)
    registry = os.path.join(models_dir, "registry.yaml")
    port, door_port = free_port(), free_port()
    address = f"tls://127.0.0.1:{port}"
    scheduler = start(
        "scheduler",
        *("dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--protocol", "tls"),
        *("--dashboard-address", "127.0.0.1:0", *tls),
        *("--preload", "warmserve.scheduler_plugin", "--warmserve-registry", registry),
    )
    worker = start(
        "worker",
        *("dask", "worker", address, "--nthreads", "1", "--memory-limit", "0", *tls),
        *("--preload", "warmserve.worker_plugin", "--warmserve-devices", "cpu:0"),
        *("--warmserve-registry", registry),
    )
    door = start(
        "frontdoor",
        *("warmserve", "frontdoor", "--scheduler", address, *tls),
        *("--host", "127.0.0.1", "--port", str(door_port), "--registry", registry),
    )
    url = f"http://127.0.0.1:{door_port}"
    client_tls = {"ca-file": ca, "client.cert": cert, "client.key": key}
    with dask.config.set({f"distributed.comm.tls.{k}": v for k, v in client_tls.items()}):
        wait_until(lambda: has_worker(address), "the worker's device registers", scheduler, worker)
    wait_until(lambda: answers(f"{url}/health"), "the front door serves", door)

    body = {"model": "tiny-0", "prompt": "Deploy", "max_tokens": 4, "temperature": 0.0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=DEADLINE)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4

    shown = status(address, *tls)
    assert shown.returncode == 0 and "/cpu:0" in shown.stdout, shown.stdout + shown.stderr
    _, other_cert, other_key = make_certs(tmp_path, "other")
    stranger = status(
        address, "--tls-ca-file", ca, "--tls-cert", other_cert, "--tls-key", other_key
    )
    assert stranger.returncode == 2 and "cannot reach" in stranger.stderr, stranger.stderr
    bare = status(address)
    assert bare.returncode == 2 and "--tls-ca-file" in bare.stderr, bare.stderr
    assert refused(address, no_certificate())
    assert refused(f"tcp://127.0.0.1:{port}")

    for proc in (door, worker, scheduler):
        assert ctrl_c(proc) == 0
    log = (tmp_path / "frontdoor.log").read_text()
    assert "Traceback" not in log, log
