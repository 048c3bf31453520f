"""Importing WarmServe's modules has no side effects, and the pure ones load no Dask, vLLM or
torch (issue 24): each case runs in a fresh interpreter, so what earlier tests imported does not
count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("dask", "distributed", "vllm", "torch")

# Every module of the policy package, then report which heavy packages got loaded.
LOADED = """
import importlib, json, pkgutil, sys
for name in {modules!r}:
    module = importlib.import_module(name)
    if name == "warmserve.policy":
        for info in pkgutil.iter_modules(module.__path__):
            importlib.import_module(f"{{name}}.{{info.name}}")
print(json.dumps(sorted({{n.split(".")[0] for n in sys.modules}} & set({heavy!r}))))
"""


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "modules",
    [
        ["warmserve"],
        ["warmserve.policy"],  # and every module in it
        ["warmserve.protocol", "warmserve.registry"],
        ["warmserve.sim.engine", "warmserve.sim.cluster"],
    ],
)
def test_pure_modules_load_no_dask_vllm_or_torch(modules: list[str]) -> None:
    assert json.loads(run(LOADED.format(modules=modules, heavy=HEAVY))) == []


def test_importing_the_scheduler_preload_changes_nothing() -> None:
    """The page is served, and the Prometheus collector registered, when the preload sets up
    (``warmserve.dashboard.install``), not when ``--preload`` imports the module: importing it
    leaves Dask's dashboard pages and the global Prometheus registry as they were."""
    code = """
import json, prometheus_client
from distributed.dashboard.scheduler import applications
pages, collectors = set(applications), set(prometheus_client.REGISTRY._collector_to_names)
import sys, warmserve.scheduler_plugin
print(json.dumps({
    "pages": sorted(set(applications) - pages),
    "collectors": len(set(prometheus_client.REGISTRY._collector_to_names) - collectors),
    "heavy": sorted({n.split(".")[0] for n in sys.modules} & {"vllm", "torch"}),
    "page_module": "warmserve.dashboard.page" in sys.modules,
}))
"""
    assert json.loads(run(code)) == {
        "pages": [],
        "collectors": 0,
        "heavy": [],
        "page_module": False,
    }
