"""One Dask comm between a front door and a worker, for every request it streams there.

Streaming over a comm per request cost one message per token per request. A Dask comm message
takes about 46 us of CPU to write and read back, msgpack framing and the socket included
(3 us a chunk when 32 chunks share a message; an ad hoc measurement on this project's 2-core
machine, not kept in bench/results). At
32 concurrent streams on a GPU, the worker's event loop then held the GIL for about a
millisecond and a half of every engine step, time the engine's thread waited for. Decode
throughput at 64 streams was 0.54x that of vLLM's own server (bench/results/gpu_decode_64.json),
whose engine core sends its API server one message per step for all requests. Over a channel,
what every stream produced in one engine step goes out as one message: the engine hands a
step's chunks to the event loop in one call (``Engine._deliver``), the streams' tasks post
them, and the writer sends everything posted since its last write.

Both ways, messages are ``{"batch": [item, ...]}``:

- front door to worker: ``["go", request]`` (a ``GenerateRequest`` as a dict) starts a
  request; ``["stop", request_id]`` abandons one;
- worker to front door: ``[request_id, "chunk", body]`` (``protocol.chunk_to_wire``),
  ``[request_id, "done", None]`` and ``[request_id, "error", {"kind", "message"}]``.

A channel that closes ends every request on it, as a request's own comm closing did: the worker
aborts them in their engines, and the front door's streams raise the comm's error (an
``OSError``, which the front door retries elsewhere if no token was sent yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

from distributed.comm import Comm, CommClosedError, connect

from warmserve.protocol import GenerateRequest, TokenChunk, chunk_to_wire
from warmserve.worker_plugin.errors import (
    BadRequest,
    WarmServeWorkerError,
    error_from_wire,
)

logger = logging.getLogger(__name__)

Generate = Callable[[GenerateRequest], AsyncIterator[TokenChunk]]


class _Outbox:
    """Items posted from any task, written by one task: all that was posted since the last
    write goes out as one message, and writes never interleave on the comm."""

    def __init__(self, comm: Comm) -> None:
        self._comm = comm
        self._items: list[list] = []
        self._posted = asyncio.Event()
        self._writer = asyncio.ensure_future(self._write())

    def post(self, item: list) -> None:
        self._items.append(item)
        self._posted.set()

    async def _write(self) -> None:
        with contextlib.suppress(CommClosedError, OSError):  # the reader sees it too
            while True:
                await self._posted.wait()
                self._posted.clear()
                items, self._items = self._items, []
                await self._comm.write({"batch": items})

    async def close(self) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer


# --- the worker's side ----------------------------------------------------------------------


async def serve(comm: Comm, generate: Generate) -> None:
    """Run the requests a front door sends over ``comm`` until it closes (a worker handler)."""
    out = _Outbox(comm)
    running: dict[str, asyncio.Task] = {}

    async def run(request: dict) -> None:
        request_id = str(request.get("request_id"))
        try:
            async for chunk in generate(GenerateRequest(**request)):
                out.post([request_id, "chunk", chunk_to_wire(chunk)])
            out.post([request_id, "done", None])
        except WarmServeWorkerError as e:
            out.post([request_id, "error", {"kind": e.kind, "message": str(e)}])
        except (TypeError, ValueError) as e:
            out.post([request_id, "error", {"kind": BadRequest.kind, "message": str(e)}])
        except Exception as e:  # our bug: the front door answers 500 with its request id
            logger.exception("request %s failed", request_id)
            message = f"the worker failed: {type(e).__name__}"
            out.post([request_id, "error", {"kind": WarmServeWorkerError.kind, "message": message}])
        finally:
            running.pop(request_id, None)

    try:
        while True:
            msg = await comm.read()
            for what, arg in msg["batch"]:
                if what == "go":
                    running[str(arg["request_id"])] = asyncio.ensure_future(run(arg))
                else:
                    task = running.pop(str(arg), None)
                    if task is not None:
                        task.cancel()
    except (CommClosedError, OSError):
        pass  # the front door went away: its requests end below
    finally:
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        await out.close()
        if not comm.closed():
            await comm.close()


# --- the front door's side ------------------------------------------------------------------


class _Channel:
    """A front door's channel to one worker; its requests' outputs go to their queues."""

    def __init__(self, comm: Comm, on_close: Callable[[_Channel], None]) -> None:
        self.comm = comm
        self.out = _Outbox(comm)
        self.streams: dict[str, asyncio.Queue] = {}
        self.error: BaseException | None = None
        self._on_close = on_close
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.comm.read()
                for request_id, kind, body in msg["batch"]:
                    queue = self.streams.get(request_id)
                    if queue is not None:
                        queue.put_nowait((kind, body))
        except Exception as e:  # closed, or broken: every request on it ends with the error
            self.error = e if isinstance(e, OSError) else CommClosedError(f"channel broke: {e}")
            for queue in self.streams.values():
                queue.put_nowait(("lost", self.error))
            self.streams.clear()
            self._on_close(self)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        if self.error is not None:
            raise self.error
        request_id = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        self.out.post(["go", asdict(request)])
        over = False
        try:
            while True:
                kind, body = await queue.get()
                if kind == "chunk":
                    yield TokenChunk(**body)
                    continue
                over = True
                if kind == "done":
                    return
                if kind == "error":
                    raise error_from_wire(body["kind"], body["message"])
                raise body  # the channel's error
        finally:
            self.streams.pop(request_id, None)
            if not over and self.error is None:
                self.out.post(["stop", request_id])

    async def close(self) -> None:
        await self.out.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.comm.close()


class Channels:
    """A front door's channels, one per worker, opened on a request's first need and dropped
    when they break (the next request to that worker opens a new one)."""

    def __init__(self, handler: str, connection_args: dict[str, Any]) -> None:
        self._handler = handler
        self._args = connection_args
        self._open: dict[str, asyncio.Future[_Channel]] = {}

    async def generate(self, address: str, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Stream ``request`` from the worker at ``address``; raises its errors (from
        :mod:`warmserve.worker_plugin.errors`), or an ``OSError`` if the channel breaks.
        Closing the iterator early abandons the request on the worker."""
        channel = await self._channel(address)
        async with contextlib.aclosing(channel.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _channel(self, address: str) -> _Channel:
        opening = self._open.get(address)
        if opening is None:
            opening = self._open[address] = asyncio.ensure_future(self._connect(address))
        try:
            return await asyncio.shield(opening)
        except BaseException:
            if self._open.get(address) is opening and opening.done():
                del self._open[address]  # a failed connect is not kept: the next one tries
            raise

    async def _connect(self, address: str) -> _Channel:
        comm = await connect(address, **self._args)
        await comm.write({"op": self._handler, "reply": False})
        return _Channel(comm, lambda c: self._forget(address, c))

    def _forget(self, address: str, channel: _Channel) -> None:
        opening = self._open.get(address)
        if opening is not None and _opened(opening) is channel:
            del self._open[address]

    async def close(self) -> None:
        opened, self._open = self._open, {}
        for opening in opened.values():
            channel = _opened(opening)
            if channel is not None:
                await channel.close()
            else:
                opening.cancel()


def _opened(opening: asyncio.Future[_Channel]) -> _Channel | None:
    """The channel ``opening`` gave, or None while it connects or if it failed."""
    if not opening.done() or opening.cancelled() or opening.exception() is not None:
        return None
    return opening.result()
