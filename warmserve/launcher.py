"""``warmserve up``: the whole system on one machine, for a first run, demos and tests.

It starts what the distributed deployment starts by hand, the same way: a scheduler with
``--preload warmserve.scheduler_plugin``, one worker process per device with ``--preload
warmserve.worker_plugin --warmserve-devices cuda:I`` for each GPU (the worker pins its process to
it) or ``cpu:I`` for each CPU slot, in a ``SpecCluster`` because each worker gets a different
device flag, and the front door on uvicorn, all on 127.0.0.1 (the dashboard too, unless
``--dashboard-address`` says otherwise). With ``--tls`` every Dask comm (scheduler, workers,
nannies, the front door's client) is TLS with a self-signed certificate made at start and kept in
memory, for this run only. vLLM starts child processes, so workers are not daemonic
(``distributed.worker.daemon: False``). SIGINT and SIGTERM stop the server first, then the
cluster, so engines and their memory go away with it. ``warmserve frontdoor`` runs the same front
door against a cluster started by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import dask.config
import httpx
import uvicorn
from distributed import Nanny, Scheduler, SpecCluster
from distributed.security import Security

from warmserve import config, console, options
from warmserve.frontdoor.server import listening, stop_on_signals
from warmserve.policy.factory import POLICIES
from warmserve.registry import Registry
from warmserve.worker_plugin.devices import UP_CPU_SLOTS, expand_devices

logger = logging.getLogger("warmserve.launcher")

HOST = "127.0.0.1"
DASHBOARD = f"{HOST}:0"  # the dashboard's default: this machine only, any free port
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (it comes with vLLM), else on asyncio's loop:
    the front door, the Dask client and the scheduler share this loop, so every request's HTTP
    and comm work runs on it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def temporary_security() -> Security:
    """A self-signed certificate for every role of one machine's cluster, made now and kept in
    memory only, with encryption required (``--tls``)."""
    try:
        return Security.temporary()
    except ImportError as e:  # it needs the cryptography package
        raise click.ClickException(f"--tls: {e}") from None


def cluster_spec(
    registry_file: str,
    policy: str,
    devices: list[str],
    dashboard_address: str = DASHBOARD,
    security: Security | None = None,
) -> tuple[dict, dict]:
    """Scheduler and worker specs for a SpecCluster: one worker (one process) per device, a GPU
    (``cuda:N``) or a CPU slot (``cpu:N``), as :func:`expand_devices` lists them. A dashboard
    address other than :data:`DASHBOARD` is the operator's: the scheduler preload keeps it as
    given (``--warmserve-public-dashboard``). With ``security``, every comm is TLS."""
    preload_argv = ["--warmserve-policy", policy, "--warmserve-registry", registry_file]
    if dashboard_address != DASHBOARD:
        preload_argv.append("--warmserve-public-dashboard")
    tls = {"protocol": "tls", "security": security} if security else {}
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": HOST,
            "port": 0,
            "dashboard_address": dashboard_address,
            "preload": ["warmserve.scheduler_plugin"],
            "preload_argv": [preload_argv],
            **tls,
        },
    }
    workers = {
        f"device-{i}": {
            "cls": Nanny,
            "options": {
                "host": HOST,
                "nthreads": 1,
                # Engines live in child processes the nanny does not measure; no memory kill.
                "memory_limit": 0,
                "preload": ["warmserve.worker_plugin"],
                "preload_argv": [
                    ["--warmserve-devices", device, "--warmserve-registry", registry_file]
                ],
                **tls,
            },
        }
        for i, device in enumerate(devices)
    }
    return scheduler, workers


async def start_cluster(
    registry_file: str,
    policy: str,
    devices: int | str | list[str] | None,
    dashboard_address: str = DASHBOARD,
    security: Security | None = None,
) -> SpecCluster:
    """An asynchronous SpecCluster running WarmServe's scheduler and worker plugins.

    ``devices``: a list of :func:`expand_devices`, or what it expands (a count of CPU slots,
    ``"cuda"``, a list as one string, None for the visible GPUs or else CPU slots)."""
    if not isinstance(devices, list):
        devices = expand_devices(devices)
    dask.config.set({"distributed.worker.daemon": False})
    scheduler, workers = cluster_spec(
        os.path.abspath(registry_file), policy, devices, dashboard_address, security
    )
    return await SpecCluster(
        workers=workers,
        scheduler=scheduler,
        asynchronous=True,
        name="warmserve",
        security=security,
    )


@dataclass
class Serving:
    """A running stack: the cluster, the front door's server and its URL."""

    cluster: SpecCluster
    server: uvicorn.Server
    task: asyncio.Future
    url: str


@contextlib.asynccontextmanager
async def serving(
    registry: Registry,
    registry_file: str,
    policy: str = "warmserve",
    devices: int | str | list[str] | None = 2,
    port: int = 0,
    tls: bool = False,
    dashboard_address: str = DASHBOARD,
    **app_options,
) -> AsyncIterator[Serving]:
    """Cluster plus front door on 127.0.0.1 for the body of the block; both stop after it.

    ``devices`` as :func:`start_cluster` takes them (default: 2 CPU slots, GPUs or not);
    ``tls``: every Dask comm over TLS (:func:`temporary_security`); ``app_options`` go to
    :func:`~warmserve.frontdoor.app.create_app` (queue limits, timeout). Tests and benchmarks
    use this too, so they run what ``warmserve up`` runs.
    """
    from warmserve.frontdoor.app import create_app

    security = temporary_security() if tls else None
    async with await start_cluster(
        registry_file, policy, devices, dashboard_address, security
    ) as cluster:
        app = create_app(
            cluster.scheduler_address, registry, security=cluster.security, **app_options
        )
        async with listening(app, HOST, port) as door:
            yield Serving(cluster, door.server, door.task, door.url)


async def up(
    policy: str,
    devices: list[str],
    port: int,
    models_dir: str,
    demo: bool,
    registry: Registry,
    tls: bool = False,
    dashboard_address: str = DASHBOARD,
) -> None:
    """Start everything, serve until a signal (or the demo's end), then stop everything."""
    registry_file = os.path.join(models_dir, "registry.yaml")
    t0 = time.perf_counter()
    async with serving(
        registry, registry_file, policy, devices, port, tls, dashboard_address
    ) as stack:
        with stop_on_signals(stack.server):  # before "up": a signal may follow at once
            click.echo(
                f"WarmServe is up in {time.perf_counter() - t0:.1f}s: {stack.url}/v1 "
                f"({len(registry)} models, devices {','.join(devices)}, policy {policy}); "
                f"scheduler {stack.cluster.scheduler_address}, "
                f"dashboard {stack.cluster.dashboard_link}"
            )
            if demo:
                await run_demo(stack.url, registry)
            else:
                click.echo("Ctrl-C stops it.")
                await stack.task
    click.echo("WarmServe stopped.")


def demo_requests(registry: Registry) -> list[tuple[str, str, dict]]:
    """(endpoint, label, body): each family, completions and chat, streaming and not."""
    out = []
    for i, (family, specs) in enumerate(registry.families().items()):
        model = specs[0].name
        out.append(
            (
                "completions",
                f"{model} completion{'' if i % 2 else ', streamed'}",
                {
                    "model": model,
                    "prompt": "The scheduler assigns each task to",
                    "max_tokens": 12,
                    "temperature": 0.0,
                    "stream": i % 2 == 0,
                },
            )
        )
        out.append(
            (
                "chat/completions",
                f"{model} chat{', streamed' if i % 2 else ''}",
                {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Say hello from {family}."}],
                    "max_tokens": 12,
                    "temperature": 0.0,
                    "stream": i % 2 == 1,
                },
            )
        )
    return out


async def run_demo(url: str, registry: Registry) -> None:
    """Send the demo requests one by one and print each answer and its TTFT."""
    key = config.get("frontdoor.api-key")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as http:
        for endpoint, label, body in demo_requests(registry):
            t0 = time.perf_counter()
            ttft = None
            text = ""
            if body["stream"]:
                async with http.stream("POST", f"/v1/{endpoint}", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        piece = choice.get("text") or choice.get("delta", {}).get("content") or ""
                        if piece and ttft is None:
                            ttft = time.perf_counter() - t0
                        text += piece
            else:
                resp = await http.post(f"/v1/{endpoint}", json=body)
                resp.raise_for_status()
                choice = resp.json()["choices"][0]
                text = choice.get("text") or choice["message"]["content"]
                ttft = time.perf_counter() - t0  # the whole answer is the first token here
            click.echo(f"[{label}] TTFT {ttft * 1000:.0f} ms: {text!r}")


def _devices_option(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    try:
        return expand_devices(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


@click.command("up")
@click.option("--policy", type=click.Choice(POLICIES), default="warmserve", show_default=True)
@click.option(
    "--devices",
    default=None,
    callback=_devices_option,
    help="Devices, one worker each: a count of CPU slots (2: cpu:0 and cpu:1), cuda (every "
    "visible GPU) or a list (cuda:0,cuda:1 or cpu:0,cpu:1) [default: every visible GPU, "
    f"else {UP_CPU_SLOTS} CPU slots].",
)
@click.option("--port", default=8000, show_default=True, help="Front door port (0: any free).")
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Model families; generated if missing [default: warmserve.models-dir].",
)
@click.option("--demo", is_flag=True, help="Send a few example requests, print them, exit.")
@options.api_key_option()
@click.option(
    "--tls",
    is_flag=True,
    help="Dask comms over TLS, with a self-signed certificate made for this run (in memory).",
)
@click.option(
    "--dashboard-address",
    default=DASHBOARD,
    show_default=True,
    help="Where the scheduler's dashboard and /metrics listen (:8787: every interface, port "
    "8787; port 0: any free one, printed).",
)
@click.option("--verbose", is_flag=True, help="Show Dask's and vLLM's INFO logs too.")
def command(
    policy: str,
    devices: list[str],
    port: int,
    models_dir: str | None,
    demo: bool,
    tls: bool,
    dashboard_address: str,
    verbose: bool,
) -> None:
    """Start a local cluster with WarmServe and its OpenAI-compatible front door, all on
    127.0.0.1 (the dashboard too, unless --dashboard-address says otherwise).

    Request limits (warmserve.frontdoor.*): a body over max-body-bytes (1 MiB) is 400; a head
    over max-header-bytes (64 KiB) or with more than max-headers (256) headers is 431.
    """
    from warmserve.models.make import ensure_default_models

    console.configure(verbose)
    try:
        config.check_keys()  # as the preloads would, but before anything starts
    except ValueError as e:
        raise click.ClickException(f"warmserve configuration: {e}") from None
    models_dir = os.path.abspath(models_dir or config.get("models-dir"))
    click.echo(f"Models in {models_dir} (generated if missing)...")
    registry = ensure_default_models(models_dir)
    run(up(policy, devices, port, models_dir, demo, registry, tls, dashboard_address))
    # Everything this command started has stopped; what is left is the interpreter's exit, whose
    # garbage collections walk every object still alive (torch's, imported for the models,
    # Dask's, Bokeh's): 1 to 2 s after Ctrl-C on 2 loaded cores. Frozen, they are skipped.
    gc.freeze()
