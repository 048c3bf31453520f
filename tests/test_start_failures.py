"""A model whose every start fails answers 503 with the reason, instead of waiting until timeout.

Found on the H100: a start that failed every time (a switch that raised) left its requests queued
at the front door, each pass asking for another start, until the request timeout (504 after 300
s). The fault here is real: a model of the ``tiny`` family whose weights file is truncated, so
vLLM cannot load it and the weight store cannot read it.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from tests.stack import BackgroundStack
from warmserve.models.make import REGISTRY_FILE, ensure_default_models
from warmserve.models.weights import WEIGHTS_FILE
from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin.state import START_ATTEMPTS

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models_dir = os.fspath(tmp_path_factory.mktemp("start-failures"))
    registry = ensure_default_models(models_dir)
    good = registry["tiny-0"]
    broken = os.path.join(models_dir, "broken-0")
    shutil.copytree(good.path, broken)
    weights = os.path.join(broken, WEIGHTS_FILE)
    os.truncate(weights, os.path.getsize(weights) // 2)
    spec = ModelSpec("broken-0", good.family, good.nbytes, path=broken)
    registry = registry.merged(Registry([spec]))
    registry_file = os.path.join(models_dir, REGISTRY_FILE)
    registry.to_yaml(registry_file)
    with BackgroundStack(registry, registry_file, devices=1) as s:
        yield s


def test_a_model_that_never_starts_gets_503_with_the_reason(stack):
    body = {"model": "broken-0", "prompt": "hello", "max_tokens": 2}
    with httpx.Client(base_url=stack.url, timeout=600) as client:
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"]
        message = answer.json()["error"]["message"]
        assert f"failed {START_ATTEMPTS} times in a row" in message
        assert "/" not in message.replace("see the scheduler log", "")  # no server path
        streamed = client.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 503
        # The worker is unharmed: a good model of the same family starts and serves.
        ok = client.post("/v1/completions", json={**body, "model": "tiny-0"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["text"] is not None
