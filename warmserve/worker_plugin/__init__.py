"""WarmServe's Dask worker preload and plugin.

Start a worker with::

    dask worker tcp://HOST:8786 --preload warmserve.worker_plugin \
        [--warmserve-devices cpu:0,cpu:1 | cuda:0,cuda:1] [--warmserve-device-memory 2GiB] \
        [--warmserve-node NAME] [--warmserve-registry PATH] [--warmserve-config C.yaml]

(under a nanny, as ``dask worker`` starts it, so that it comes back after a scheduler restart:
see :func:`~warmserve.worker_plugin.plugin.rejoin_after_scheduler_loss`)
or register :class:`WarmServeWorker` from a client. Engines run inside the worker process
(``warmserve.engine``), so no daemon setting is needed for them. A worker given one GPU
(``cuda:N``, the N-th visible one) pins its process to it through ``CUDA_VISIBLE_DEVICES`` before
anything initialises CUDA (see :mod:`warmserve.worker_plugin.devices`), so its engines run
there. Heavy imports (torch, vLLM) wait until the plugin is set up, so the front door can import
:mod:`warmserve.worker_plugin.channel` and :func:`generate` cheaply.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable

import click
from dask.utils import parse_bytes

from warmserve import console, options
from warmserve.loopback import keep_http_local
from warmserve.options import OptionError
from warmserve.protocol import GenerateRequest, TokenChunk
from warmserve.worker_plugin import settings
from warmserve.worker_plugin.devices import parse_list

__all__ = ["dask_setup", "generate"]


def _parsed_by(
    parse: Callable[[str], object], flag: str
) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A click callback that lets ``flag``'s value through once ``parse`` accepts it."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            try:
                parse(value)
            except ValueError as e:
                raise OptionError(f"{flag}: {e}") from None
        return value

    return check


@click.command()
@options.config_option("--warmserve-config", settings.check)
@click.option(
    "--warmserve-devices",
    default=None,
    callback=_parsed_by(parse_list, "--warmserve-devices"),
    help="Devices of this worker, e.g. cuda:0, cpu:0,cpu:1 or cuda:0,cuda:1 (default: visible "
    "GPUs, else warmserve.worker.cpu-slots CPU slots). With one GPU cuda:N (the N-th visible "
    "one), the process sets CUDA_VISIBLE_DEVICES to that GPU alone.",
)
@click.option(
    "--warmserve-device-memory",
    default=None,
    callback=_parsed_by(parse_bytes, "--warmserve-device-memory"),
    help="Memory budget of each device, e.g. 2GiB (default: NVML, else "
    "warmserve.worker.device-memory).",
)
@click.option(
    "--warmserve-node",
    default=None,
    help="Node name in device ids (default: warmserve.worker.node, else the hostname).",
)
@options.registry_option("--warmserve-registry")
@options.public_dashboard_option("--warmserve-public-dashboard")
async def dask_setup(
    worker,
    warmserve_devices: str | None,
    warmserve_device_memory: str | None,
    warmserve_node: str | None,
    warmserve_registry: str,
) -> None:
    """The ``--preload`` entry point: attach the plugin to this worker (its flags were checked
    when they were parsed, see :mod:`warmserve.options`)."""
    from warmserve.worker_plugin.devices import pin_cuda

    console.show_ours()
    keep_http_local(worker)
    pinned = pin_cuda(warmserve_devices)  # first: the plugin's imports bring torch and vLLM
    if worker.nanny:
        run_by_nanny()
    from warmserve.worker_plugin.plugin import WarmServeWorker, rejoin_after_scheduler_loss

    plugin = WarmServeWorker(
        devices=warmserve_devices,
        node=warmserve_node,
        device_memory=warmserve_device_memory,
        registry=warmserve_registry,
        pinned=pinned,
    )
    await worker.plugin_add(plugin, name=plugin.name)
    rejoin_after_scheduler_loss(worker)  # before the worker registers: it takes the stream then


def run_by_nanny() -> None:
    """Make this worker process one that its nanny alone stops, and that ends quietly.

    Ctrl-C in a terminal signals every process of its group: this one ignores SIGINT and is
    stopped by its nanny (its stop queue, then a clean close), not by a KeyboardInterrupt that
    would break its event loop mid-close with a traceback. Its engines skip freeing memory on
    that close (see ``Engine.shutdown``), after which Triton's bindings, which vLLM imports,
    print some 600 "nanobind: leaked ..." lines as the interpreter finalizes: an exit handler
    registered before any engine exists (exit handlers run last-in, first-out, so after the
    engines' and vLLM's) closes stderr first.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit.register(_close_stderr)


def _close_stderr() -> None:
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


def generate(request: GenerateRequest) -> TokenChunk:
    """A Dask task: run ``request`` on this worker's instance of its model to the end.

    Submit it to the worker the scheduler routed to:
    ``client.submit(generate, request, workers=[addr], pure=False)``. Raises NoInstance when the
    worker has no active instance of the model and EngineDied if its engine dies meanwhile.
    """
    from distributed import get_worker
    from distributed.utils import sync

    from warmserve.worker_plugin.plugin import NAME

    worker = get_worker()
    return sync(worker.loop, worker.plugins[NAME].complete, request)
