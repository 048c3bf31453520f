"""``warmserve frontdoor --scheduler tcp://HOST:8786``: the OpenAI front door of a running cluster.

The cluster is one an operator started with ``dask scheduler --preload
warmserve.scheduler_plugin`` and ``dask worker ... --preload warmserve.worker_plugin`` (README,
"Deploy on a cluster"); this serves what ``warmserve up`` serves in front of its own cluster.
The scheduler is asked first, over one plain comm, whether it runs WarmServe
(:func:`warmserve.status.fetch`), so a wrong address or a scheduler without the preload ends
the command with one line instead of a front door that answers 503. The registry must be
readable here: the front door tokenizes prompts with the models' own files. A cluster started
with Dask's ``--tls-*`` flags is reached with the same flags here (a certificate signed by the
cluster's CA): every comm, to the scheduler and to the workers it streams from, is then TLS.
"""

from __future__ import annotations

import click

from warmserve import console, options
from warmserve.launcher import run
from warmserve.registry import Registry


async def serve(scheduler: str, host: str, port: int, registry: Registry) -> None:
    """Check the scheduler, then serve until SIGINT or SIGTERM."""
    from warmserve.frontdoor.app import create_app
    from warmserve.frontdoor.server import listening, stop_on_signals
    from warmserve.status import fetch

    try:
        app = create_app(scheduler, registry)
    except (ValueError, TypeError) as e:  # a warmserve.frontdoor.* value of the wrong kind
        raise click.ClickException(f"warmserve configuration: {e}") from None
    await fetch(scheduler, timeout=10.0)
    async with listening(app, host, port) as door:
        with stop_on_signals(door.server):  # before the line: a signal may follow at once
            click.echo(
                f"WarmServe front door at {door.url}/v1 ({len(registry)} models), "
                f"scheduler {scheduler}. Ctrl-C stops it."
            )
            await door.task
    click.echo("WarmServe front door stopped.")


@click.command("frontdoor")
@options.config_option("--config")
@click.option(
    "--scheduler",
    required=True,
    help="Scheduler address (tcp://HOST:PORT; tls://HOST:PORT with the --tls-* flags).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on, for the API, /health and /metrics (0.0.0.0: every interface).",
)
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0: any free).")
@options.registry_option("--registry")
@options.api_key_option()
@options.tls_options()
@click.option("--verbose", is_flag=True, help="Show Dask's INFO logs and WarmServe's DEBUG too.")
def command(scheduler: str, host: str, port: int, registry: str, verbose: bool) -> None:
    """Serve the OpenAI-compatible API in front of a running WarmServe cluster.

    The --tls-* flags, as Dask's commands take them, reach a scheduler started with Dask's own
    --tls-* flags at tls://HOST:PORT.

    Request limits (warmserve.frontdoor.*): a body over max-body-bytes (1 MiB) is 400; a head
    over max-header-bytes (64 KiB) or with more than max-headers (256) headers is 431.
    """
    console.configure(verbose)
    run(serve(scheduler, host, port, Registry.from_yaml(registry)))
