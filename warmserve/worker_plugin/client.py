"""What the front door imports to stream a request from a worker (no torch, no vLLM).

Streaming goes over one Dask comm: the front door sends a ``WORKER_GENERATE`` message
(:mod:`warmserve.protocol`) and the worker's handler writes one message per :class:`TokenChunk`
before its final reply. That costs
one msgpack frame per chunk on an already open connection, with no scheduler on the path and no
task, Queue or pub/sub bookkeeping (measured in ``bench/activation_worker.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict

from distributed.comm import connect
from distributed.core import ConnectionPool

from warmserve.protocol import WORKER_GENERATE, GenerateRequest, TokenChunk
from warmserve.worker_plugin.errors import WarmServeWorkerError, error_from_wire


async def stream_generate(
    worker_address: str, request: GenerateRequest, pool: ConnectionPool | None = None
) -> AsyncIterator[TokenChunk]:
    """Stream ``request``'s output from the worker at ``worker_address``, chunk by chunk.

    Raises the worker's error (NoInstance, UnknownModel, EngineDied, BadRequest, ... from
    :mod:`warmserve.worker_plugin.errors`) when the request cannot run or stops midway.
    Closing the iterator early closes the connection, which aborts the request on the worker.
    With ``pool`` (e.g. the Dask client's ``rpc``), a connection that finished cleanly is
    reused by the next request.
    """
    comm = await (pool.connect(worker_address) if pool else connect(worker_address))
    clean = False
    try:
        await comm.write({"op": WORKER_GENERATE, "request": asdict(request), "reply": True})
        while True:
            msg = await comm.read()
            if "chunk" in msg:
                yield TokenChunk(**msg["chunk"])
            elif "error" in msg:
                clean = True
                raise error_from_wire(msg["error"]["kind"], msg["error"]["message"])
            elif msg.get("done"):
                clean = True
                return
            elif msg.get("status") == "uncaught-error":  # the handler raised: a worker bug
                clean = True
                text = msg.get("exception_text", "")
                raise WarmServeWorkerError(f"the worker {worker_address} failed: {text}")
            else:
                raise WarmServeWorkerError(f"unexpected message from {worker_address}: {msg!r}")
    finally:
        if clean and pool is not None:
            pool.reuse(worker_address, comm)
        else:
            await comm.close()
