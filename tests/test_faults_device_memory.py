"""A device that runs out of memory at activation: the request is answered 503 with the
reason (and a streamed one too, before any event), nothing stays reserved, and the worker goes
on serving the models that fit.

The cause is real, not faked: the device's budget, set as an operator sets it
(``--warmserve-device-memory 384MiB``), is smaller than the worker's engines need, while the
planner, which charges an instance its weights and a KV cache of half their size, sees room.
An engine takes its weights plus ``warmserve.worker.engine-kv`` (256 MiB) of KV cache: tiny's
(2 MB of weights) fits, small's (214 MB of weights) not at all. The
cluster is a LocalCluster with both plugins (one worker process, one CPU slot), the front door
uvicorn in a thread, as in :mod:`tests.test_restart_scheduler`.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest
from distributed import Client
from distributed.core import error_message

from tests.leaks import leftovers, shm_left
from tests.stack import default_models, plugin_cluster
from tests.test_restart_scheduler import FrontDoor, poll
from warmserve.models.make import make_family
from warmserve.registry import Registry
from warmserve.scheduler_plugin.state import START_ATTEMPTS
from warmserve.worker_plugin.errors import (
    DeviceTooSmall,
    DoesNotFit,
    WarmServeWorkerError,
    arrived,
)

pytestmark = pytest.mark.engine

BODY = {"prompt": "out of memory", "max_tokens": 3}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """The cluster, a client of it and the front door, on the default families and small-0."""
    _, registry_file = default_models(tmp_path_factory, "device-memory-models")
    make_family("small", "small", replicas=1, out=os.path.dirname(registry_file))
    shm_files = set(os.listdir("/dev/shm"))
    with (
        plugin_cluster(
            registry_file, "cpu:0", "node-o", "--warmserve-device-memory", "384MiB"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1)
        door = FrontDoor(cluster.scheduler_address, Registry.from_yaml(registry_file))
        door.start()
        try:
            yield client, door.url
        finally:
            door.stop()
    poll(lambda: not shm_left(shm_files), "nothing left in /dev/shm")


def clean(client: Client) -> bool:
    return all(not left for left in client.run(leftovers).values())


def test_an_engine_larger_than_the_device_fails_with_the_reason(cluster):
    client, url = cluster
    big = {**BODY, "model": "small-0"}
    r = httpx.post(f"{url}/v1/completions", json=big, timeout=300)
    assert r.status_code == 503, r.text
    # Each request tries once more (so may the planner): the count only grows.
    failing = re.compile(r"starting small-0 failed (\d+) times in a row \(DeviceTooSmall\)")
    tries = failing.search(r.json()["error"]["message"])
    assert tries and int(tries[1]) >= START_ATTEMPTS, r.text
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**big, "stream": True}, timeout=300
    ) as s:  # streamed: the same answer, before any event
        assert s.status_code == 503 and s.headers["retry-after"] == "3"
        assert failing.search(json.loads(s.read())["error"]["message"]), s.text
    assert clean(client)

    r = httpx.post(f"{url}/v1/completions", json={**BODY, "model": "tiny-0"}, timeout=300)
    assert r.status_code == 200, r.text
    assert clean(client)


def test_the_scheduler_tells_no_room_now_from_a_device_too_small():
    """The scheduler unpickles nothing: a worker's error reaches it as the text Dask sends
    (``exception_text``), from which the kind must come back."""
    for error in (DoesNotFit("d: no room now"), DeviceTooSmall("d: more than the device's")):
        try:
            raise error
        except WarmServeWorkerError as e:
            received = Exception(error_message(e, status="uncaught-error")["exception_text"])
        rebuilt = arrived(received)
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
    other = Exception("OSError('no route')")
    assert arrived(other) is other
