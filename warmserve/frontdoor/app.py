"""The OpenAI-compatible front door: a Starlette app that routes through the Dask scheduler.

Per request: validate (:mod:`~warmserve.frontdoor.schemas`), take a free slot of a lease this
front door holds or else ask the scheduler's ``warmserve_route`` for an instance (waiting in
:mod:`~warmserve.frontdoor.admission`'s queue when all are full), stream tokens from the engine on
the routed worker over a Dask comm (``warmserve.worker_plugin.client.stream_generate``), and
report the request done in the next batch to the scheduler (:mod:`~warmserve.frontdoor.leases`).
Nothing is answered before a route exists, so queueing and overload get real HTTP statuses
(429, 503) even for streaming requests; once the first token is sent, a failure becomes an
error event in the stream, as in vLLM's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from distributed import Client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HTTPRoute

from warmserve import config, protocol
from warmserve.frontdoor.admission import Admission
from warmserve.frontdoor.catalog import Catalog
from warmserve.frontdoor.errors import APIError
from warmserve.frontdoor.leases import Leases
from warmserve.frontdoor.metrics import Metrics
from warmserve.frontdoor.schemas import Kind, Parsed, parse_json, parse_request
from warmserve.frontdoor.shapes import DONE, Shaper, sse
from warmserve.protocol import TokenChunk
from warmserve.registry import Registry

logger = logging.getLogger("warmserve.frontdoor")
request_logger = logging.getLogger("warmserve.frontdoor.requests")

RECONNECT = 1.0  # seconds between looks at the scheduler connection (and new-client attempts)
MAX_BODY = 1 << 20  # bytes; a prompt that fits any context here is far smaller
T = TypeVar("T")


class WorkerLost(Exception):
    """The worker or engine serving a request went away after tokens were already sent."""


class ClientGone(Exception):
    """The HTTP client disconnected before an answer started."""


@dataclass
class FrontDoor:
    """State shared by the handlers of one app."""

    scheduler: str | Client
    catalog: Catalog
    max_queue: int
    retry_after: int
    request_timeout: float
    lease_slots: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    client: Client | None = None
    admission: Admission | None = None
    leases: Leases | None = None
    _owns_client: bool = False
    _watch: asyncio.Task | None = None

    async def connect(self) -> None:
        """Use the given asynchronous client, or connect one in this event loop."""
        if isinstance(self.scheduler, Client) and self.scheduler.asynchronous:
            self.client = self.scheduler
        else:
            address = (
                self.scheduler.scheduler.address
                if isinstance(self.scheduler, Client)
                else self.scheduler
            )
            self.client = await self._new_client(address)
            self._owns_client = True
            self._watch = asyncio.ensure_future(self._keep_connected(address))
        self.leases = Leases(self._sync)
        self.leases.start()
        self.admission = Admission(
            self._route,
            self.max_queue,
            self.retry_after,
            self.metrics,
            self.leases,
            self.lease_slots,
        )
        logger.info("front door connected to %s", self.client.scheduler.address)

    @staticmethod
    async def _new_client(address: str, **options: Any) -> Client:
        return await Client(address, asynchronous=True, name="warmserve-frontdoor", **options)

    async def _keep_connected(self, address: str) -> None:
        """Replace the client once it gave up on the scheduler.

        A Dask client whose scheduler goes away reconnects to the same address for
        ``distributed.comm.timeouts.connect`` and then closes for good; a front door must
        outlive a longer scheduler restart, so it then connects a new client (a new id: the
        scheduler, restarted, knows none of the old one's leases anyway). Meanwhile requests
        get 503 with Retry-After (:meth:`away`)."""
        while True:
            await asyncio.sleep(RECONNECT)
            assert self.client is not None
            if self.client.status != "closed":
                continue
            try:
                self.client = await self._new_client(address, timeout=f"{RECONNECT}s")
            except (OSError, TimeoutError) as e:
                logger.debug("scheduler %s still away: %s", address, e)
                continue
            logger.info("front door reconnected to %s", address)

    def away(self) -> APIError:
        """What a request gets while the scheduler cannot be reached."""
        return APIError(
            503,
            "the scheduler cannot be reached (restarting?); retry later",
            headers={"Retry-After": str(self.retry_after)},
        )

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.leases is not None:
            await self.leases.close()
        if self._owns_client and self.client is not None:
            await self.client.close()

    async def _route(
        self, model: str, request_id: str, exclude: tuple[str, ...], lease: int
    ) -> dict:
        assert self.client is not None
        if self.client.status != "running":  # a call would wait for the connect timeout
            raise self.away()
        try:
            return await getattr(self.client.scheduler, protocol.SCHEDULER_ROUTE)(
                model=model,
                request_id=request_id,
                exclude=list(exclude),
                holder=self.client.id,
                lease=lease,
            )
        except OSError:
            raise self.away() from None

    async def _sync(self, events: list[list], returned: list[str], held: list[str]) -> dict:
        assert self.client is not None
        return await getattr(self.client.scheduler, protocol.SCHEDULER_SYNC)(
            holder=self.client.id, events=events, returned=returned, held=held
        )

    def done(self, model: str, request_id: str) -> None:
        """Report the request over (in the next batch) and wake this model's queue."""
        assert self.admission is not None and self.leases is not None
        self.leases.finish(request_id)
        self.admission.wake(model)

    async def chunks(self, parsed: Parsed) -> AsyncIterator[TokenChunk]:
        """Tokens of ``parsed`` from a routed instance, retrying elsewhere if an instance
        fails before its first token."""
        from warmserve.worker_plugin.client import stream_generate

        assert self.admission is not None and self.client is not None
        assert self.leases is not None
        model = parsed.model
        exclude: tuple[str, ...] = ()
        while True:
            route = await self.admission.admit(model, parsed.generate.request_id, exclude)
            self.metrics.running.labels(model).inc()
            sent = False
            try:
                stream = stream_generate(route.worker, parsed.generate, pool=self.client.rpc)
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        sent = True
                        yield chunk
                return
            except (OSError, *EngineErrors.lost) as e:  # a nested tuple is a TypeError here
                if sent:
                    raise WorkerLost(f"{route.instance} failed mid-request: {e}") from e
                logger.info("%s failed before a token (%s); retrying", route.instance, e)
                exclude += (route.instance,)
                self.leases.drop(model, route.instance)
                await self.leases.flush()  # the scheduler must see this try before the next
            finally:
                self.metrics.running.labels(model).dec()
                if route.lease is not None:
                    self.leases.release(route.lease)


class EngineErrors:
    """The worker plugin's errors, imported when the first request needs them."""

    lost: tuple[type[Exception], ...] = ()

    @classmethod
    def load(cls) -> None:
        from warmserve.worker_plugin.errors import EngineDied, NoInstance

        cls.lost = (EngineDied, NoInstance)


def create_app(
    scheduler: str | Client,
    registry: Registry,
    *,
    max_queue: int | None = None,
    retry_after: int | None = None,
    request_timeout: float | None = None,
    lease: int | None = None,
) -> Starlette:
    """The front door for the models in ``registry``, routing through ``scheduler`` (an address,
    or a Client whose address is used; an asynchronous Client in the server's loop is used as is).
    Unset limits come from ``warmserve.frontdoor.*``; ``lease`` is the number of slots asked
    for with each route (0: a route per request)."""
    EngineErrors.load()
    door = FrontDoor(
        scheduler,
        Catalog(registry),
        max_queue=int(max_queue if max_queue is not None else config.get("frontdoor.max-queue")),
        retry_after=int(retry_after or config.get("frontdoor.retry-after")),
        request_timeout=float(request_timeout or config.get("frontdoor.request-timeout")),
        lease_slots=int(lease if lease is not None else config.get("frontdoor.lease")),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await door.connect()
        yield
        await door.close()

    async def completions(request: Request) -> Response:
        return await _serve(door, request, "completion")

    async def chat(request: Request) -> Response:
        return await _serve(door, request, "chat")

    async def models(request: Request) -> Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "warmserve",
                "root": name,
                "parent": None,
                "max_model_len": door.catalog[name].context,
            }
            for name in door.catalog.names()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        assert door.client is not None
        if door.client.status != "running":
            return door.away().response()
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(door.metrics.render(), media_type=door.metrics.content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        """Starlette's own answers (no such path, wrong method) in OpenAI's error shape."""
        assert isinstance(exc, HTTPException)
        return APIError(exc.status_code, exc.detail, headers=exc.headers).response()

    app = Starlette(
        exception_handlers={HTTPException: http_error},
        routes=[
            HTTPRoute("/v1/completions", completions, methods=["POST"]),
            HTTPRoute("/v1/chat/completions", chat, methods=["POST"]),
            HTTPRoute("/v1/models", models, methods=["GET"]),
            HTTPRoute("/health", health, methods=["GET"]),
            HTTPRoute("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.door = door
    return app


async def _read_body(request: Request) -> bytes:
    """The body, or 413 as soon as it grows past ``MAX_BODY``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise APIError(413, f"request body is larger than {MAX_BODY} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise APIError(413, f"request body is larger than {MAX_BODY} bytes")
    return bytes(body)


async def _serve(door: FrontDoor, request: Request, kind: Kind) -> Response:
    endpoint = "completions" if kind == "completion" else "chat"
    try:
        parsed = parse_request(kind, parse_json(await _read_body(request)), door.catalog)
    except APIError as e:
        door.metrics.requests.labels("", endpoint, str(e.status)).inc()
        return e.response()
    except ClientDisconnect:
        door.metrics.requests.labels("", endpoint, "499").inc()
        return Response(status_code=499)
    model = parsed.model
    received = time.perf_counter()
    request_logger.debug("%s for %s", parsed.generate.request_id, model)
    tracker = _Tracker(door, parsed, endpoint, received)
    stream = door.chunks(parsed)
    deadline = asyncio.get_running_loop().time() + door.request_timeout

    async def start() -> TokenChunk | None:
        """The first token (streaming), or the whole answer folded into one chunk."""
        async with asyncio.timeout_at(deadline):
            if parsed.stream:
                first = await anext(stream, None)
                tracker.token(first)
                return first
            return await _collect(stream, tracker)

    try:
        head = await _until_disconnect(request, start())
    except BaseException as e:
        await stream.aclose()
        tracker.finish(_status_of(e))
        if isinstance(e, asyncio.CancelledError):
            raise
        if isinstance(e, ClientGone):
            return Response(status_code=499)  # nobody reads it; the engine request is cancelled
        return _error_of(e).response()
    if parsed.stream:
        return StreamingResponse(
            _events(parsed, tracker, head, stream, deadline),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    await stream.aclose()
    tracker.finish("200")
    assert head is not None
    body = Shaper(parsed).full(
        head.text, head.finish_reason or "length", tracker.prompt_tokens, tracker.tokens
    )
    return JSONResponse(body)


async def _collect(stream: AsyncIterator[TokenChunk], tracker: _Tracker) -> TokenChunk:
    """Every chunk of ``stream`` joined into one (for answers without ``stream``)."""
    texts: list[str] = []
    finish = None
    async for chunk in stream:
        tracker.token(chunk)
        texts.append(chunk.text)
        finish = chunk.finish_reason or finish
    return TokenChunk("".join(texts), [], finish)


def _status_of(e: BaseException) -> str:
    if isinstance(e, APIError):
        return str(e.status)
    if isinstance(e, ClientGone | asyncio.CancelledError):
        return "499"
    return str(_error_of(e).status)


def _error_of(e: BaseException) -> APIError:
    """What a failure on the request path tells the client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, TimeoutError):
        return APIError(
            504, "the request did not finish within warmserve.frontdoor.request-timeout"
        )
    if isinstance(e, WorkerLost):
        return APIError(503, f"the instance serving this request was lost: {e}")
    if isinstance(e, ValueError | TypeError):  # the engine refused the input (e.g. too long)
        return APIError(400, str(e))
    if isinstance(e, OSError):
        return APIError(503, f"no instance could serve the request: {e}")
    logger.warning("request failed: %r", e)
    return APIError(500, f"{type(e).__name__}: {e}")


@dataclass
class _Tracker:
    """TTFT, TPOT and the outcome of one request, recorded exactly once."""

    door: FrontDoor
    parsed: Parsed
    endpoint: str
    received: float
    first: float | None = None
    last: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    finished: bool = False

    def token(self, chunk: TokenChunk | None) -> None:
        if chunk is None:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.prompt_tokens = chunk.prompt_tokens
            self.door.metrics.ttft.labels(self.parsed.model).observe(now - self.received)
        self.last = now
        self.tokens += len(chunk.token_ids)

    def finish(self, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        model = self.parsed.model
        self.door.metrics.requests.labels(model, self.endpoint, status).inc()
        if self.first is not None and self.tokens > 1:
            self.door.metrics.tpot.labels(model).observe(
                (self.last - self.first) / (self.tokens - 1)
            )
        self.door.done(model, self.parsed.generate.request_id)
        request_logger.debug(
            "%s %s: %d tokens", self.parsed.generate.request_id, status, self.tokens
        )


async def _events(
    parsed: Parsed,
    tracker: _Tracker,
    first: TokenChunk | None,
    stream: AsyncIterator[TokenChunk],
    deadline: float,
) -> AsyncIterator[bytes]:
    """Server-sent events of one streaming answer; the engine request is cancelled (the stream
    closed) if the client goes away."""
    shaper = Shaper(parsed)
    status = "200"
    try:
        role = shaper.role_chunk()
        if role is not None:
            yield sse(role)
        chunk = first
        while chunk is not None:
            yield sse(shaper.chunk(chunk.text, chunk.finish_reason))
            async with asyncio.timeout_at(deadline):
                chunk = await anext(stream, None)
            tracker.token(chunk)
        if parsed.include_usage:
            yield sse(shaper.usage_chunk(tracker.prompt_tokens, tracker.tokens))
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        raise
    except Exception as e:
        error = _error_of(e)
        status = str(error.status)
        yield sse(error.body())
    finally:
        await stream.aclose()
        tracker.finish(status)
    yield DONE


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (raises ClientGone)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone
