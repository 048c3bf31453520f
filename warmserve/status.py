"""``warmserve status --scheduler ADDR``: what the WarmServe page shows, as tables in a terminal.

It asks the scheduler's ``SCHEDULER_OBSERVE`` handler (:mod:`warmserve.protocol`, installed with
the scheduler plugin) for its latest picture over one plain comm, without registering a Dask
client, so it is cheap to run in a loop (``watch warmserve status ...``). An unreachable
scheduler, or one without WarmServe, exits with status 2 and says which.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import click
import dask.config
from dask.utils import format_bytes
from distributed.core import rpc
from distributed.security import Security

from warmserve import options
from warmserve.dashboard.view import ClusterView
from warmserve.protocol import SCHEDULER_OBSERVE


class StatusError(click.ClickException):
    """A failure that leaves nothing to show; exits 2, like a usage error."""

    exit_code = 2


async def fetch(address: str, timeout: float) -> dict[str, Any]:
    """The scheduler's answer to ``SCHEDULER_OBSERVE``; StatusError when there is none. TLS
    as ``distributed.comm.tls.*`` configures it (:func:`warmserve.options.tls_options`)."""
    args = Security().get_connection_args("client")
    tls = address.startswith("tls://")
    if tls and args["ssl_context"] is None:  # Dask would raise a TypeError
        raise StatusError(f"{address} is a TLS address: give --tls-ca-file and --tls-cert")
    if args["require_encryption"] and not tls:  # and a RuntimeError here
        raise StatusError(f"{address} is not a TLS address (tls://), and TLS flags were given")
    with dask.config.set({"distributed.comm.timeouts.connect": timeout}):
        try:
            async with rpc(address, timeout=timeout, connection_args=args) as scheduler:
                answer = await getattr(scheduler, SCHEDULER_OBSERVE)()
        except OSError as e:  # refused, timed out, closed
            raise StatusError(f"cannot reach the scheduler at {address}: {e}") from None
    if answer is None:  # a scheduler answers None for a handler it does not have
        raise StatusError(
            f"the scheduler at {address} has no WarmServe plugin "
            "(start it with --preload warmserve.scheduler_plugin)"
        )
    return answer


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart."""
    cells = [[str(h) for h in headers], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells)
    return "\n".join(line.rstrip() for line in lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(address: str, view: ClusterView, prewarm: dict[str, Sequence[int]]) -> str:
    """The devices table and the models table."""
    devices = table(
        ["DEVICE", "NODE", "WORKER", "STATE", "MEMORY USED", "LENT", "MODELS (TIER)"],
        [
            [
                d.id,
                d.node,
                d.worker or "-",
                d.mode,
                "?" if d.used is None else f"{format_bytes(d.used)} / {format_bytes(d.memory)}",
                format_bytes(d.lent),
                ", ".join(f"{m} ({t})" for m, t in d.models.items()) or "-",
            ]
            for d in view.devices
        ],
    )
    models = table(
        [
            "MODEL",
            "FAMILY",
            "LOAD",
            "FORECAST AVG",
            "FORECAST PEAK",
            "INSTANCES",
            "STARTING",
            "QUEUED",
            "HOST MEMORY",
            "PREWARM HITS",
            "MISSES",
        ],
        [
            [
                m.name,
                m.family,
                _num(m.load),
                _num(m.forecast_avg),
                _num(m.forecast_peak),
                m.instances,
                m.starting,
                m.queued,
                ", ".join(m.host_nodes) or "-",
                *prewarm.get(m.name, (0, 0)),
            ]
            for m in view.models
        ],
    )
    head = (
        f"WarmServe at {address}: policy {view.policy}, {len(view.devices)} devices, "
        f"{len(view.models)} models"
    )
    return f"{head}\n\n{devices}\n\n{models}"


@click.command("status")
@click.option(
    "--scheduler",
    "address",
    required=True,
    help="Scheduler address (tcp://HOST:PORT; tls://HOST:PORT with the --tls-* flags).",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for it.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw picture as JSON.")
@options.tls_options()
def command(address: str, timeout: float, as_json: bool) -> None:
    """Show devices, their state and resident models, and per-model load and forecast."""
    answer = asyncio.run(fetch(address, timeout))
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    view = ClusterView.from_dict(answer["view"])
    click.echo(render(address, view, answer.get("prewarm", {})))
