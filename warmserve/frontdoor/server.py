"""The front door on uvicorn, as ``warmserve up`` and ``warmserve frontdoor`` both run it.

uvicorn's own signal handling is off: a signal stops the server through :func:`stop_on_signals`,
and the caller then stops what it started besides (``warmserve up``: the cluster), in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import click
import uvicorn
from starlette.applications import Starlette

# Seconds a stopping server lets open requests run before it cancels them (their engine requests
# are aborted): uvicorn would wait for every stream to end, and Ctrl-C with it.
GRACE = 1.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (see the module docstring)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class _Cancelled(logging.Filter):
    """Drops a record of a task cancelled at a stop, which its logger reports with a traceback:
    a request uvicorn cancelled after :data:`GRACE` ("Exception in ASGI application"; uvicorn's
    one line "Cancel N running task(s)" says it), or the Dask client's reconnection to a
    scheduler stopped before the front door, cancelled as the client closes. Both are expected
    ends of a stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


# Loggers of this process that report tasks cancelled at a stop (see _Cancelled).
CANCELLING = ("uvicorn.error", "distributed.client")


@dataclass
class Listening:
    """A front door that serves: its uvicorn server, the task running it, and its URL."""

    server: uvicorn.Server
    task: asyncio.Future
    url: str


@contextlib.asynccontextmanager
async def listening(app: Starlette, host: str, port: int) -> AsyncIterator[Listening]:
    """``app`` served at ``host:port`` (0: any free port) for the body of the block.

    The app's startup (connecting to the scheduler) has run when the block starts; the server
    stops after it, giving open requests :data:`GRACE` seconds to finish."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE
    )
    for name in CANCELLING:  # after uvicorn.Config, which configures uvicorn's loggers
        log = logging.getLogger(name)
        if not any(isinstance(f, _Cancelled) for f in log.filters):
            log.addFilter(_Cancelled())
    server = _Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():
        task.result()
        raise click.ClickException(f"the front door could not start on {host}:{port}")
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Listening(server, task, f"http://{host}:{bound}")
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def stop_on_signals(server: uvicorn.Server) -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM stop ``server`` while the block runs (in the running loop)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
