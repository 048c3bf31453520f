"""The scheduler killed (SIGKILL) and started again while requests stream, its forecaster's
history kept in ``warmserve.scheduler.history-dir``.

The processes of :mod:`tests.test_restart_scheduler` (whose helpers this uses): ``dask
scheduler`` and ``dask worker`` with the preloads, the front door on uvicorn in a thread. Load
windows are 2 s and the planner runs every second, so tiny-0's windows close, and the history
is written, within the test. The kill comes once the history on disk holds tiny-0 and a stream
has tokens, with another stream open. The worker, which loses its scheduler, ends its process
(engines with it) and its nanny starts a new one; so each stream ends either complete or with a
503 error event, then ``[DONE]``, never hanging. The front door then reconnects and serves, and
the restarted scheduler's forecaster holds exactly the history saved before the kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys

import cloudpickle
import dask.config
import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from distributed import Client

from tests.leaks import shm_left
from tests.test_faults_prewarm import call
from tests.test_restart_scheduler import (
    POLLS,
    FrontDoor,
    free_port,
    health,
    listens,
    poll,
    scheduler,
    stop,
    worker,
)
from warmserve.policy.forecast import Forecaster
from warmserve.registry import Registry
from warmserve.scheduler_plugin import history
from warmserve.scheduler_plugin.extension import NAME
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

STREAMS = 2
LONG = {"model": "tiny-0", "prompt": "restart", "max_tokens": 400, "ignore_eos": True}
SHORT = {**LONG, "max_tokens": 3}


async def stream(url: str, started: list[int]) -> tuple[int, list[str]]:
    """Status and the data of each event of one long stream; its first token noted in
    ``started``."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=300) as http,
        http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r,
    ):
        if r.status_code != 200:
            return r.status_code, [(await r.aread()).decode()]
        lines: list[str] = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if not lines:
                    started.append(1)
                lines.append(line[6:])
        return r.status_code, lines


async def kill_mid_stream(url: str, victim: subprocess.Popen) -> list[tuple[int, list[str]]]:
    started: list[int] = []
    tasks = [asyncio.ensure_future(stream(url, started)) for _ in range(STREAMS)]
    for _ in range(POLLS):
        if started:
            break
        await asyncio.sleep(0.1)
    assert started, "no stream produced a token"
    # Within a poll of a first token, hundreds of tokens before its stream's end.
    assert not all(t.done() for t in tasks), "every stream ended before the kill"
    victim.send_signal(signal.SIGKILL)
    return await asyncio.gather(*tasks)


# ``dask scheduler`` runs in its own process, where ``tests`` is not importable (unless
# PYTHONPATH names the checkout): functions of this module go to it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def forecaster_of(dask_scheduler) -> tuple:
    """The scheduler's forecaster: its models, state and parameters, and the window length."""
    ext = dask_scheduler.extensions[NAME]
    forecaster = ext.policy.forecaster
    return forecaster.models, forecaster.state(), forecaster.params, ext.history.window


def saved_history_has(path: str, model: str) -> bool:
    return os.path.exists(path) and model in pq.read_table(path).column("model").to_pylist()


def test_scheduler_restart_mid_stream(tiny_registry: Registry, models_dir: str, tmp_path):
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        restart_mid_stream(tiny_registry, models_dir, tmp_path)


def restart_mid_stream(tiny_registry: Registry, models_dir: str, tmp_path) -> None:
    registry_file = os.path.join(models_dir, "registry.yaml")
    history_file = os.fspath(tmp_path / "history" / history.FILE)
    config_file = tmp_path / "warmserve.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "warmserve": {
                    "scheduler": {"history-dir": os.fspath(tmp_path / "history")},
                    "forecast": {"window": 2, "period": 60},
                    "planner": {"tick": 1},
                }
            }
        )
    )
    flags = ("--warmserve-config", os.fspath(config_file))
    shm_files = set(os.listdir("/dev/shm"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [scheduler(port, registry_file, *flags)]
    nanny = worker(address, registry_file)
    door = None
    try:
        poll(lambda: listens(port), "the scheduler listens")
        door = FrontDoor(address, tiny_registry)
        door.start()
        r = httpx.post(f"{door.url}/v1/completions", json=SHORT, timeout=300)
        assert r.status_code == 200, r.text
        poll(lambda: saved_history_has(history_file, "tiny-0"), "tiny-0's windows on disk")

        results = asyncio.run(kill_mid_stream(door.url, procs[0]))
        procs[0].wait()
        before = os.fspath(tmp_path / "before.parquet")
        shutil.copy(history_file, before)  # what the killed scheduler saved last
        complete = failed = 0
        for status, lines in results:
            assert status == 200, lines  # routed before the kill
            assert lines[-1] == "[DONE]", lines[-3:]  # closed properly, no hang
            events = [json.loads(x) for x in lines[:-1]]
            errors = [e["error"] for e in events if "error" in e]
            if errors:
                assert len(errors) == 1 and errors[0]["code"] == 503, errors
                assert "lost" in errors[0]["message"], errors
                failed += 1
            else:
                assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
                complete += 1
        assert complete + failed == STREAMS

        procs.append(scheduler(port, registry_file, *flags))
        poll(lambda: (h := health(door.url)) is not None and h.status_code == 200, "reconnect")
        with Client(address, timeout="30s") as client:
            proxy = WarmServeProxy(client)
            poll(
                lambda: any(d["worker"] for d in proxy.status()["devices"]),
                "the worker's device registered with the new scheduler",
            )
            # No request has reached the new scheduler yet, so no window of its own closed:
            # its forecaster is what it loaded.
            models, state, params, window = client.run_on_scheduler(forecaster_of)
            saved = Forecaster(params)
            assert history.load(saved, before, window) == len(saved.models) > 0
            assert "tiny-0" in saved.models and models == saved.models
            for name, array in saved.state().items():
                assert np.array_equal(state[name], array, equal_nan=True), name

            r = httpx.post(f"{door.url}/v1/completions", json=SHORT, timeout=300)
            assert r.status_code == 200, r.text

            def settled() -> bool:
                s = proxy.status()
                return not s["queued"] and all(i["load"] == 0 for i in s["instances"])

            poll(settled, "no request left on the new scheduler's books")
            (device,) = proxy.status()["devices"]
            status = call(device["worker"], "warmserve_status")
            # The new worker process runs one engine, serving the instance the scheduler knows.
            (slot,) = status["devices"][0]["engine_slots"]
            assert [i["id"] for i in proxy.status()["instances"]] == [slot["instance"]]
        assert nanny.poll() is None  # the same `dask worker` (its nanny) throughout
    finally:
        stop(door, nanny, procs)
    poll(lambda: not shm_left(shm_files), "nothing left in /dev/shm")
