"""The WarmServe dashboard page and both /metrics endpoints, under a small real workload.

One cluster for the module: the scheduler and worker plugins (two CPU slots, real vLLM engines
on the tiny family) and the front door on uvicorn, all on 127.0.0.1. Load windows are a few
seconds long so the forecaster has closed windows to forecast from while the tests run, and
the autoscaler's grace is long so the instances the workload started are still up. The
page is opened in headless Chromium driven over the DevTools protocol: Bokeh draws the page in
the browser, inside shadow roots, so its text is read by a script in the page once drawn.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import httpx
import pytest
import uvicorn
from distributed import Client, LocalCluster
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection, connect

from tests.stack import plugin_cluster
from warmserve.frontdoor.app import create_app
from warmserve.registry import Registry
from warmserve.scheduler_plugin.proxy import WarmServeProxy

pytestmark = pytest.mark.engine

# The page's picture goes to the test's tmp dir, so a test run leaves the tree clean; set
# WARMSERVE_DASHBOARD_PNG=bench/results/dashboard.png to refresh the committed one.
SCREENSHOT_ENV = "WARMSERVE_DASHBOARD_PNG"
DEVICES = ("node-d/cpu:0", "node-d/cpu:1")
WORKLOAD = ("tiny-0", "tiny-0", "tiny-1", "tiny-0", "tiny-1")
PATIENCE = 120  # seconds to wait for something to appear before failing (not a timing check)


@dataclass
class Serving:
    cluster: LocalCluster
    url: str  # the front door


def wait_for(what: str, check, interval: float = 0.5):
    """Poll ``check`` until it returns something truthy; fail after PATIENCE seconds."""
    deadline = time.monotonic() + PATIENCE
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def serving(tiny_registry: Registry, models_dir: str) -> Iterator[Serving]:
    registry = os.path.join(models_dir, "registry.yaml")
    with (
        dask.config.set(
            {
                "distributed.worker.daemon": False,
                "warmserve.forecast.window": 4,
                "warmserve.planner.tick": 2,
                # Instances outlive the workload, so every test sees them (no scale-down).
                "warmserve.autoscaler.grace": 3600,
            }
        ),
        plugin_cluster(registry, ",".join(d.split("/")[1] for d in DEVICES), "node-d") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(1)
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(cluster.scheduler_address, tiny_registry),
                host="127.0.0.1",
                port=0,
                log_level="warning",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for("the front door", lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=300) as http:
            for model in WORKLOAD:
                body = {"model": model, "prompt": "Warm weights", "max_tokens": 8}
                http.post("/v1/completions", json=body).raise_for_status()
        try:
            yield Serving(cluster, url)
        finally:
            server.should_exit = True
            thread.join()


def dashboard(serving: Serving) -> str:
    return serving.cluster.dashboard_link.rsplit("/", 1)[0]


# -- Prometheus -------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, list]:
    """Family name -> samples, as Prometheus would read them."""
    text = httpx.get(url, timeout=30).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str | None = None, **labels: str) -> float:
    """The sum of the samples named ``name`` (any, if None) whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if (name is None or s.name == name) and labels.items() <= s.labels.items()
    )


def test_scheduler_metrics(serving: Serving):
    wait_for(
        "a forecast from closed windows",
        lambda: value(scrape(f"{dashboard(serving)}/metrics")["warmserve_model_forecast"]) > 0,
    )
    families, status = consistent_scrape(serving)
    for name in (
        "warmserve_devices",
        "warmserve_device_memory_bytes",
        "warmserve_resident_models",
        "warmserve_model_load",
        "warmserve_model_forecast",
        "warmserve_model_instances",
        "warmserve_model_queued",
        "warmserve_prewarm_hits",
        "warmserve_prewarm_misses",
        "warmserve_activations",
        "warmserve_bytes_moved",
    ):
        assert name in families, name
    assert value(families["warmserve_devices"]) == len(DEVICES)
    # What serves is the planner's choice and changes as windows close (it once stopped tiny-0
    # before the scrape): consistent_scrape checks the metrics against the scheduler's state.
    assert status["instances"] and value(families["warmserve_model_instances"]) >= 1
    for device in DEVICES:
        total = value(families["warmserve_device_memory_bytes"], device=device, kind="total")
        used = value(families["warmserve_device_memory_bytes"], device=device, kind="used")
        assert 0 <= used <= total
        assert total > 0
    # Every instance started was counted once, as a prewarm hit or a miss.
    started = value(families["warmserve_activations"])
    assert started >= 1
    hits_and_misses = value(families["warmserve_prewarm_hits"]) + value(
        families["warmserve_prewarm_misses"]
    )
    assert hits_and_misses == started
    assert all(s.value >= 0 for s in families["warmserve_bytes_moved"])
    assert all(s.value >= 0 for s in families["warmserve_model_load"])


def consistent_scrape(serving: Serving) -> tuple[dict[str, list], dict]:
    """The scheduler's metrics and its status once they agree on device modes and instances,
    with nothing changed while they were read. The metrics come from the dashboard observer's
    view, refreshed every tick, so they may lag the status by one; a metric that never agrees
    makes this fail after PATIENCE seconds."""
    with Client(serving.cluster) as client:
        proxy = WarmServeProxy(client)

        def snapshot() -> tuple[dict[str, list], dict] | None:
            before = proxy.status()
            families = scrape(f"{dashboard(serving)}/metrics")
            after = proxy.status()
            if any(before[k] != after[k] for k in ("devices", "instances")):
                return None
            modes = [d["mode"] for d in after["devices"]]
            models = [i["model"] for i in after["instances"]]
            named = {s.labels["model"] for s in families["warmserve_model_instances"]}
            agree = all(
                value(families["warmserve_devices"], state=m) == modes.count(m) for m in modes
            ) and all(
                value(families["warmserve_model_instances"], model=m) == models.count(m)
                for m in named | set(models)
            )
            return (families, after) if agree else None

        return wait_for("metrics that say what the scheduler holds", snapshot)


def test_frontdoor_metrics(serving: Serving):
    families = scrape(f"{serving.url}/metrics")
    for name in (
        "warmserve_requests",
        "warmserve_ttft_seconds",
        "warmserve_tpot_seconds",
        "warmserve_queue_depth",
        "warmserve_requests_running",
    ):
        assert name in families, name
    for model in set(WORKLOAD):
        n = WORKLOAD.count(model)
        requests = families["warmserve_requests"]
        assert value(requests, "warmserve_requests_total", model=model, status="200") == n
        ttft = families["warmserve_ttft_seconds"]
        assert value(ttft, "warmserve_ttft_seconds_count", model=model) == n
        assert value(ttft, "warmserve_ttft_seconds_sum", model=model) > 0
        tpot = families["warmserve_tpot_seconds"]
        assert value(tpot, "warmserve_tpot_seconds_count", model=model) == n
        assert value(families["warmserve_queue_depth"], model=model) == 0
        assert value(families["warmserve_requests_running"], model=model) == 0


# -- the page, in a browser -------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# All text on the page, shadow roots included (Bokeh draws its widgets inside them).
PAGE_TEXT = """
(() => {
  const walk = (node) => {
    let out = node.shadowRoot ? walk(node.shadowRoot) : "";
    for (const child of node.childNodes) {
      out += child.nodeType === Node.TEXT_NODE ? child.textContent + "\\n" : walk(child);
    }
    return out;
  };
  return walk(document.body);
})()
"""


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands on one page, replies by id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium")
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        port = wait_for(
            "Chromium's DevTools port",
            lambda: port_file.exists() and port_file.read_text().split("\n")[0],
        )
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        proc.wait()


def test_page_in_browser(serving: Serving, browser: DevTools, tmp_path: Path):
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        width=1400,
        height=1300,
        deviceScaleFactor=1,
        mobile=False,
    )
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{dashboard(serving)}/warmserve")

    def drawn() -> str | None:
        text = browser.evaluate(PAGE_TEXT) or ""
        wanted = [*DEVICES, "tiny-0 (active)", "dedicated", "Policy", "start", "tiny-2"]
        return text if all(w in text for w in wanted) else None

    text = wait_for("the page to show devices, models and actions", drawn)
    assert "forecast" in text.lower()
    # The page is in the dashboard's navigation bar (rendered by the template, outside Bokeh).
    links = browser.evaluate("[...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    assert "warmserve" in links
    height = browser.evaluate("document.documentElement.scrollHeight")
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        width=1400,
        height=max(int(height), 800),
        deviceScaleFactor=1,
        mobile=False,
    )
    time.sleep(1)  # a refresh or two at the new size before the picture
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.stat().st_size > 10_000
