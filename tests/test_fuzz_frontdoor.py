"""Bad input, timeouts and disconnects against a real front door on a real cluster.

One tiny family on one device, the front door on uvicorn at 127.0.0.1, and a second front door
on the same cluster whose request timeout is short (both lease slots from one scheduler). Every
fuzzed request must get a 2xx or an OpenAI-shaped 4xx, never a 5xx, and no answer may carry a
traceback, a project path or a pickle; the server must serve a valid request afterwards.
Requests cut short (timeout, client gone) must free their engine slot: the scheduler's
accounting and the worker's own count go back to zero.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import uvicorn
from distributed import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from tests.leaks import assert_clean
from tests.stack import BackgroundStack
from warmserve import config, protocol
from warmserve.frontdoor.app import create_app
from warmserve.launcher import HOST, Serving
from warmserve.models.make import make_family
from warmserve.registry import Registry
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

MODEL = "tiny-0"
JSON = {"content-type": "application/json"}
CONTEXT = int(config.get("engine.max-model-len"))  # what the engine serves (the model: 2048)
SHORT_TIMEOUT = 0.5  # seconds; a 500-token answer takes several on this machine
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@asynccontextmanager
async def short_front_door(stack: Serving, registry: Registry) -> AsyncIterator[str]:
    """A second front door on the same cluster with a short request timeout; yields its URL."""
    app = create_app(stack.cluster.scheduler_address, registry, request_timeout=SHORT_TIMEOUT)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=0, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://{HOST}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models_dir = os.fspath(tmp_path_factory.mktemp("fuzz-models"))
    registry = make_family("tiny", "tiny", replicas=2, out=models_dir)
    registry_file = os.path.join(models_dir, "registry.yaml")
    extra = partial(short_front_door, registry=registry)
    with BackgroundStack(registry, registry_file, extra=extra, devices=1) as s:
        yield s


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=300) as client:
        r = client.post("/v1/completions", json=valid())  # activate the model once
        assert r.status_code == 200, r.text
        yield client


@pytest.fixture(scope="module")
def dask_client(stack):
    with Client(stack.scheduler) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(stack) -> Tokenizer:
    return Tokenizer.from_file(os.path.join(stack.registry[MODEL].path, "tokenizer.json"))


def valid(**overrides) -> dict:
    return {"model": MODEL, "prompt": "Dask", "max_tokens": 2, "temperature": 0, **overrides}


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    """``status`` (else any 4xx) with a body ``{"error": {message, type, param, code}}``."""
    if status is not None:
        assert r.status_code == status, r.text[:300]
    else:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["code"] == r.status_code
    return error


def assert_served(r: httpx.Response) -> None:
    """A 200 answer or an OpenAI-shaped 4xx; never a 5xx, a traceback, a path or a pickle."""
    assert_clean(r.content)
    if r.status_code == 200:
        assert r.json()["choices"], r.text[:300]
    else:
        assert_openai_error(r)


def still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json=valid())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# -- fuzzing -----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
# Small valid values among the junk, so some requests get through and some fail deep inside.
max_tokens = (
    st.integers(max_value=0)
    | st.integers(min_value=CONTEXT - 1)
    | st.integers(min_value=1, max_value=3)
    | json_values
)
FIELDS = {
    "prompt": st.text(max_size=40) | json_values,
    "max_tokens": max_tokens,
    "temperature": st.floats(allow_nan=True) | json_values,
    "top_p": st.floats(allow_nan=True) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": json_values,
    "stop": st.lists(st.text(max_size=5), max_size=6) | json_values,
    "seed": st.integers(min_value=-(2**80), max_value=2**80) | json_values,
    "n": st.integers(min_value=-2, max_value=3) | json_values,
    "logprobs": st.integers(min_value=-2, max_value=22) | json_values,
    "echo": st.booleans() | json_values,
    "min_tokens": st.integers(min_value=-1, max_value=4) | json_values,
    "presence_penalty": st.floats(min_value=-3, max_value=3) | json_values,
    "repetition_penalty": st.floats(min_value=-1, max_value=3) | json_values,
    "best_of": json_values,
    "logit_bias": st.dictionaries(st.text(max_size=5), json_scalars, max_size=3) | json_values,
    "top_k": st.integers(min_value=-3, max_value=5) | json_values,
    "stop_token_ids": st.lists(st.integers(min_value=-1, max_value=2000), max_size=3) | json_values,
    "ignore_eos": json_values,
    "user": json_values,  # an OpenAI field this server ignores
    "not_a_field": json_values,  # an extra field
}


@st.composite
def completion_bodies(draw) -> dict:
    model = draw(st.sampled_from([MODEL, "no-such-model", ""]) | json_values)
    chosen = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=6))
    body = {name: draw(FIELDS[name]) for name in chosen}
    if draw(st.booleans()):
        body["model"] = model
    if body.get("stream") is True:  # keep answers short when they get through
        body["max_tokens"] = 2
    return body


@st.composite
def chat_bodies(draw) -> dict:
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "robot"]) | json_values,
            "content": st.text(max_size=30) | json_values,
        }
    )
    body = {
        "model": draw(st.sampled_from([MODEL, "gpt-9"])),
        "messages": draw(st.lists(message, max_size=3) | json_values),
        "max_tokens": draw(max_tokens),
    }
    extra = {
        "logprobs": st.booleans() | json_values,
        "top_logprobs": st.integers(min_value=-2, max_value=22) | json_values,
        "n": st.integers(min_value=-1, max_value=3),
        "stop": st.text(max_size=3) | json_values,
    }
    chosen = draw(st.lists(st.sampled_from(sorted(extra)), unique=True, max_size=3))
    return body | {name: draw(extra[name]) for name in chosen}


@FUZZ
@given(body=completion_bodies())
def test_fuzzed_completions_never_fail_the_server(http, body):
    r = http.post("/v1/completions", content=json.dumps(body, allow_nan=True), headers=JSON)
    if body.get("stream") is True and r.status_code == 200:
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert_served(r)


@FUZZ
@given(body=chat_bodies())
def test_fuzzed_chat_never_fails_the_server(http, body):
    raw = json.dumps(body, allow_nan=True)
    assert_served(http.post("/v1/chat/completions", content=raw, headers=JSON))


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_malformed_bodies_are_400(http, raw):
    r = http.post("/v1/completions", content=raw, headers=JSON)
    try:
        doc = json.loads(raw)
    except ValueError:
        assert_openai_error(r, 400)
    else:
        if not isinstance(doc, dict):
            assert_openai_error(r, 400)
        else:
            assert_served(r)


@FUZZ
@given(prompt=st.text(st.characters(codec="utf-8"), min_size=1, max_size=30))
def test_weird_unicode_prompts_are_served(http, prompt):
    r = http.post("/v1/completions", json=valid(prompt=prompt, max_tokens=1))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny-0", "prompt": "\\ud800"}',  # a lone surrogate: no valid Unicode
        b'{"model": "\\udfff", "prompt": "x"}',
        b'{"model": "tiny-0", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        b'{"model": "tiny-0", "prompt": "x", "stop": ["\\ud800"]}',
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser recurses
        b'{"model": "tiny-0", "prompt": "x", "temperature": 1' + b"0" * 400 + b"}",
        b'{"model": "tiny-0", "prompt": "x", "max_tokens": NaN}',
        b'{"model": "tiny-0", "prompt": [5000]}',  # a token id past the vocabulary
    ],
)
def test_inputs_that_used_to_reach_deep_are_400(http, raw):
    endpoint = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    r = http.post(endpoint, content=raw, headers=JSON)
    assert r.status_code in (400, 404), r.text[:300]
    assert_openai_error(r)
    still_serving(http)


def test_oversized_bodies_are_400_with_or_without_a_length(http):
    """As vLLM's server answers a prompt too long for the context (it reads any size)."""
    big = json.dumps(valid(prompt="x" * (2 << 20))).encode()
    assert_openai_error(http.post("/v1/completions", content=big, headers=JSON), 400)

    def chunks():
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    assert_openai_error(http.post("/v1/completions", content=chunks(), headers=JSON), 400)
    still_serving(http)


def test_bodies_that_are_not_declared_json_are_400(http):
    body = json.dumps(valid()).encode()
    for headers in ({}, {"content-type": "text/plain"}):
        error = assert_openai_error(http.post("/v1/completions", content=body, headers=headers))
        assert error["type"] == "Bad Request"


def test_wrong_paths_and_methods_get_openai_errors(http):
    assert_openai_error(http.get("/v1/completions"), 405)
    assert_openai_error(http.post("/v1/engines", json=valid()), 404)


# -- the context an engine serves --------------------------------------------------------------


def test_max_tokens_between_the_engine_and_the_model_context_is_400(http):
    """The model config allows 2048 tokens; the engine serves 512: the front door says so."""
    error = assert_openai_error(http.post("/v1/completions", json=valid(max_tokens=1000)), 400)
    assert str(CONTEXT) in error["message"] and error["param"] == "max_tokens"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 600}
    assert_openai_error(http.post("/v1/chat/completions", json=chat), 400)
    models = http.get("/v1/models").json()["data"]
    assert {m["max_model_len"] for m in models} == {CONTEXT}


def test_max_tokens_is_cut_to_what_the_prompt_leaves_of_the_engine_context(http):
    """As vLLM's server does: a prompt that leaves no room, or is longer alone, is 400."""
    ids = [7] * (CONTEXT - 2)
    assert http.post("/v1/completions", json=valid(prompt=ids, max_tokens=2)).status_code == 200
    r = http.post("/v1/completions", json=valid(prompt=[*ids, 7], max_tokens=2))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
    assert_openai_error(http.post("/v1/completions", json=valid(prompt=[7] * CONTEXT)), 400)
    error = assert_openai_error(
        http.post("/v1/completions", json=valid(prompt=[7] * (CONTEXT + 1))), 400
    )
    assert f"{CONTEXT + 1} input tokens" in error["message"]


def test_text_prompts_are_counted_as_the_engine_counts_them(http, tokenizer):
    """At the boundary exactly: the prompt is counted as the engine counts it, and a
    ``max_tokens`` one more than fits is cut to fit."""
    prompt = "The scheduler assigns each task to a worker, and ünïcödé costs bytes. " * 10
    n = len(tokenizer.encode(prompt).ids)
    assert CONTEXT // 2 < n < CONTEXT
    fits = http.post("/v1/completions", json=valid(prompt=prompt, max_tokens=CONTEXT - n))
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["prompt_tokens"] == n
    over = http.post("/v1/completions", json=valid(prompt=prompt, max_tokens=CONTEXT - n + 1))
    assert over.status_code == 200 and over.json()["usage"]["total_tokens"] <= CONTEXT
    huge = "word " * 200_000  # about 1 MB: rejected from its size, without tokenizing
    assert_openai_error(http.post("/v1/completions", json=valid(prompt=huge)), 400)


# -- timeouts and disconnects free the engine slot ----------------------------------------------


def settled(dask_client: Client) -> bool:
    """No request left in the scheduler's accounting nor in the worker's engines."""
    status = WarmServeProxy(dask_client).status()
    if status["in_flight"].get(MODEL, 0) or any(i["load"] for i in status["instances"]):
        return False
    worker = status["instances"][0]["worker"]

    async def worker_status(dask_scheduler):
        return await getattr(dask_scheduler.rpc(worker), protocol.WORKER_STATUS)()

    report = dask_client.run_on_scheduler(worker_status)
    return all(i["in_flight"] == 0 for i in report["instances"])


def wait_settled(dask_client: Client) -> None:
    for _ in range(600):  # polls until the batched report reached the scheduler
        if settled(dask_client):
            return
        dask_client.sync(asyncio.sleep, 0.1)
    assert settled(dask_client)


LONG = valid(prompt="long", max_tokens=CONTEXT - 12, ignore_eos=True)


def test_request_timeout_is_504_and_frees_the_slot(http, stack, dask_client):
    with httpx.Client(base_url=stack.extra, timeout=300) as short:
        assert_openai_error(short.post("/v1/completions", json=LONG), 504)
        wait_settled(dask_client)
        with short.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            text = r.read().decode()
    if r.status_code == 200:  # the first token came in time: the error is the last event
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 504
    else:
        assert r.status_code == 504 and json.loads(text)["error"]["code"] == 504
    wait_settled(dask_client)
    still_serving(http)


def test_client_disconnect_mid_stream_frees_the_slot(http, dask_client):
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
    wait_settled(dask_client)
    still_serving(http)


# -- failures that are our bug ----------------------------------------------------------------


def _break_sampling(broken: bool) -> None:
    """On the worker: make building SamplingParams raise what no handler expects (as the
    tuple of stop strings once did), or undo that."""
    from warmserve.engine import engine

    if broken:
        engine._real_sampling_params = engine._sampling_params

        def fail(req):
            raise AssertionError(f"broken at {engine.__file__}")

        engine._sampling_params = fail
    else:
        engine._sampling_params = engine._real_sampling_params


@pytest.mark.parametrize("stream", [False, True])
def test_an_unexpected_worker_failure_is_an_internal_error_with_a_logged_id(
    http, dask_client, caplog, stream
):
    dask_client.run(_break_sampling, True)
    try:
        r = http.post("/v1/completions", json=valid(stream=stream))
    finally:
        dask_client.run(_break_sampling, False)
    assert_clean(r.content)
    error = assert_openai_error(r, 500) if r.status_code != 200 else None
    if error is None:  # streamed: the error is the last event before [DONE]
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        error = json.loads(events[-2])["error"]
    request_id = error["message"].removeprefix("internal error (request id ").rstrip(")")
    assert request_id.startswith("cmpl-") and error["type"] == "InternalServerError"
    assert any(request_id in record.getMessage() for record in caplog.records)
    still_serving(http)
