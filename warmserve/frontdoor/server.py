"""The front door on uvicorn, as ``warmserve up`` and ``warmserve frontdoor`` both run it.

uvicorn's own signal handling is off: a signal stops the server through :func:`stop_on_signals`,
and the caller then stops what it started besides (``warmserve up``: the cluster), in order.
Requests are parsed by :class:`LimitedHttp`, which bounds their heads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import click
import uvicorn
from dask.utils import parse_bytes
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from warmserve import config
from warmserve.frontdoor.errors import APIError

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


@dataclass(frozen=True)
class HeadLimits:
    """The most a request's head (request line and headers) may take."""

    bytes: int
    headers: int

    @classmethod
    def from_config(cls) -> HeadLimits:
        """``warmserve.frontdoor.max-header-bytes`` and ``max-headers``."""
        return cls(
            parse_bytes(str(config.get("frontdoor.max-header-bytes"))),
            int(config.get("frontdoor.max-headers")),
        )


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head over its limits."""


class LimitedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering 431 in OpenAI's error shape to a request whose
    head passes :class:`HeadLimits`, before the app sees it, and closing the connection.

    httptools (llhttp) has no limit of its own: uvicorn on it buffers a head of any size (a
    20 MB header and 5,000 headers were both answered 200), and so does vLLM's server, whose
    ``h11_max_*`` settings bind only uvicorn's h11 parser. Here a head is counted as it
    arrives, so no more than the limit and one read is ever buffered: a read that lies wholly
    inside a head counts whole; the URL and headers count as the parser hands them over (each
    header as its name, value and 4 bytes of separators), which also covers a head that
    begins or ends inside a read."""

    def __init__(self, *args, limits: HeadLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_head = True
        self._ends = 0  # heads and messages that ended on this connection
        self._read = 0  # bytes of the reads that lay wholly inside the current head
        self._parsed = 0  # bytes of its URL and headers, as parsed
        self._headers = 0
        self._refusal: str | None = None

    def data_received(self, data: bytes) -> None:
        ends = self._ends
        super().data_received(data)
        inside = self._in_head and ends == self._ends  # no head or body ended in this read
        if inside and self._refusal is None and not self.transport.is_closing():
            self._read += len(data)
            if self._read > self.limits.bytes:
                self._refuse(self._too_many_bytes())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed = self._headers = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._headers > self.limits.headers:
            self._refusal = f"The request has more than {self.limits.headers} headers " + (
                "(warmserve.frontdoor.max-headers)."
            )
            raise _HeadTooLarge
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._ends += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._read = True, 0
        self._ends += 1

    def _count(self, size: int) -> None:
        self._parsed += size
        if self._parsed > self.limits.bytes:
            self._refusal = self._too_many_bytes()
            raise _HeadTooLarge  # httptools raises it on as an HttpParserError

    def _too_many_bytes(self) -> str:
        return f"The request's headers take more than {self.limits.bytes} bytes " + (
            "(warmserve.frontdoor.max-header-bytes)."
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head the parser refused: 431 where a limit refused it."""
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(self._refusal)

    def _refuse(self, message: str) -> None:
        self._refusal = message
        body = json.dumps(APIError(431, message).body()).encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[431],
                    *(b"%s: %s\r\n" % header for header in self.server_state.default_headers),
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()


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
    stops after it, giving open requests :data:`GRACE` seconds to finish. Request heads are
    bounded by :class:`HeadLimits` from the configuration."""
    limited = functools.partial(LimitedHttp, limits=HeadLimits.from_config())
    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=limited,
        log_level="warning",
        timeout_graceful_shutdown=GRACE,
    )
    for name in CANCELLING:  # after uvicorn.Config, which configures uvicorn's loggers
        log = logging.getLogger(name)
        if not any(isinstance(f, _Cancelled) for f in log.filters):
            log.addFilter(_Cancelled())
    server = _Server(settings)
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
