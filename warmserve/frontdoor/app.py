"""The OpenAI-compatible front door: a Starlette app that routes through the Dask scheduler.

Per request: validate (:mod:`~warmserve.frontdoor.schemas`), take a free slot of a lease this
front door holds or else ask the scheduler's ``warmserve_route`` for an instance (waiting in
:mod:`~warmserve.frontdoor.admission`'s queue when all are full), stream tokens from the engine on
the routed worker over the front door's channel to it (``warmserve.worker_plugin.channel``), and
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
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from dask.utils import parse_bytes
from distributed import Client
from distributed.security import Security
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HTTPRoute

from warmserve import config
from warmserve.frontdoor.auth import RequireKey
from warmserve.frontdoor.catalog import Catalog
from warmserve.frontdoor.door import EngineErrors, FrontDoor, WorkerLost
from warmserve.frontdoor.errors import APIError, SchemaError, internal
from warmserve.frontdoor.schemas import Kind, Parsed, parse_json, parse_request
from warmserve.frontdoor.shapes import DONE, Shaper, sse
from warmserve.protocol import TokenChunk
from warmserve.registry import Registry

logger = logging.getLogger("warmserve.frontdoor")
request_logger = logging.getLogger("warmserve.frontdoor.requests")

Choice = tuple[int, TokenChunk]  # a chunk of the choice at that index of ``Parsed.choices``
T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before an answer started."""


def create_app(
    scheduler: str | Client,
    registry: Registry,
    *,
    max_queue: int | None = None,
    retry_after: int | None = None,
    request_timeout: float | None = None,
    lease: int | None = None,
    api_key: str | None = None,
    max_body: int | None = None,
    security: Security | None = None,
) -> Starlette:
    """The front door for the models in ``registry``, routing through ``scheduler`` (an address,
    or a Client whose address is used; an asynchronous Client in the server's loop is used as is).
    Unset limits come from ``warmserve.frontdoor.*``; ``lease`` is the number of slots asked
    for with each route (0: a route per request); with ``api_key`` (or
    ``warmserve.frontdoor.api-key``) ``/v1/*`` needs it (:mod:`warmserve.frontdoor.auth`).
    ``security`` is the Dask client's (TLS); None: ``distributed.comm.tls.*`` as configured."""
    EngineErrors.load()
    door = FrontDoor(
        scheduler,
        Catalog(registry),
        max_queue=int(max_queue if max_queue is not None else config.get("frontdoor.max-queue")),
        retry_after=int(retry_after or config.get("frontdoor.retry-after")),
        request_timeout=float(request_timeout or config.get("frontdoor.request-timeout")),
        max_body=max_body or parse_bytes(str(config.get("frontdoor.max-body-bytes"))),
        lease_slots=int(lease if lease is not None else config.get("frontdoor.lease")),
        security=security,
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

    def card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "warmserve",
            "root": name,
            "parent": None,
            "max_model_len": door.catalog[name].context,
        }

    async def models(request: Request) -> Response:
        data = [card(name) for name in door.catalog.names()]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in door.catalog:
            return APIError(404, f"The model `{name}` does not exist.", "model").response()
        return JSONResponse(card(name))

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

    async def crashed(request: Request, exc: Exception) -> Response:
        """A failure outside a request's own handling: logged, answered without details."""
        request_id = f"req-{uuid.uuid4().hex}"
        logger.error("%s %s failed (%s)", request.url.path, request_id, exc, exc_info=exc)
        return internal(request_id).response()

    key = api_key or config.get("frontdoor.api-key")
    app = Starlette(
        middleware=[Middleware(RequireKey, key=str(key))] if key else [],
        exception_handlers={HTTPException: http_error, Exception: crashed},
        routes=[
            HTTPRoute("/v1/completions", completions, methods=["POST"]),
            HTTPRoute("/v1/chat/completions", chat, methods=["POST"]),
            HTTPRoute("/v1/models", models, methods=["GET"]),
            HTTPRoute("/v1/models/{name:path}", model, methods=["GET"]),
            HTTPRoute("/health", health, methods=["GET"]),
            HTTPRoute("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.door = door
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The JSON body, or 400 as vLLM's server answers: for another content type, and as soon
    as the body grows past ``limit`` bytes (``warmserve.frontdoor.max-body-bytes``; vLLM reads
    any size and then finds the prompt longer than the context)."""
    media_type = request.headers.get("content-type", "").lower().split(";", 1)[0].strip()
    if media_type != "application/json":
        raise SchemaError("Unsupported Media Type: Only 'application/json' is allowed")
    too_big = APIError(
        400,
        f"The request body is larger than {limit} bytes (warmserve.frontdoor.max-body-bytes).",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _serve(door: FrontDoor, request: Request, kind: Kind) -> Response:
    endpoint = "completions" if kind == "completion" else "chat"
    try:
        body = parse_json(await _read_body(request, door.max_body))
        parsed = parse_request(kind, body, door.catalog)
    except APIError as e:
        door.metrics.requests.labels("", endpoint, str(e.status)).inc()
        return e.response()
    except ClientDisconnect:
        door.metrics.requests.labels("", endpoint, "499").inc()
        return Response(status_code=499)
    received = time.perf_counter()
    request_logger.debug("%s for %s", parsed.request_id, parsed.model)
    tracker = _Tracker(door, parsed, endpoint, received)
    stream = _merge([door.chunks(choice) for choice in parsed.choices])
    deadline = asyncio.get_running_loop().time() + door.request_timeout

    async def start() -> Choice | list[list[TokenChunk]] | None:
        """The first chunk (streaming), or every choice's chunks."""
        async with asyncio.timeout_at(deadline):
            if parsed.stream:
                first = await anext(stream, None)
                tracker.token(first)
                return first
            return await _collect(stream, tracker, len(parsed.choices))

    try:
        head = await _until_disconnect(request, start())
    except BaseException as e:
        await stream.aclose()
        tracker.finish(_status_of(e, parsed.request_id))
        if isinstance(e, asyncio.CancelledError):
            raise
        if isinstance(e, ClientGone):
            return Response(status_code=499)  # nobody reads it; the engine request is cancelled
        return _error_of(e, parsed.request_id).response()
    shaper = Shaper(parsed, door.catalog[parsed.model].fingerprint)
    if parsed.stream:
        assert not isinstance(head, list)
        return StreamingResponse(
            _events(shaper, tracker, head, stream, deadline),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    await stream.aclose()
    tracker.finish("200")
    assert isinstance(head, list)
    return JSONResponse(shaper.full(head, tracker.prompt_tokens, tracker.tokens))


async def _merge(streams: list[AsyncIterator[TokenChunk]]) -> AsyncIterator[Choice]:
    """The chunks of every choice's stream as they come, each with its choice's index.

    One stream is read directly; several are read by a task each, so a slow choice does not
    hold back the others (vLLM interleaves choices the same way). The first error ends all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, TokenChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenChunk]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                live -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(
    stream: AsyncIterator[Choice], tracker: _Tracker, choices: int
) -> list[list[TokenChunk]]:
    """Every chunk of ``stream``, by choice (for answers without ``stream``)."""
    outputs: list[list[TokenChunk]] = [[] for _ in range(choices)]
    async for item in stream:
        tracker.token(item)
        outputs[item[0]].append(item[1])
    return outputs


def _status_of(e: BaseException, request_id: str) -> str:
    if isinstance(e, APIError):
        return str(e.status)
    if isinstance(e, ClientGone | asyncio.CancelledError):
        return "499"
    return str(_error_of(e, request_id).status)


def _error_of(e: BaseException, request_id: str) -> APIError:
    """What a failure on the request path tells the client. Messages of the worker's and the
    engine's errors carry only their words; anything else is our bug, logged with its
    traceback under ``request_id`` and answered with that id alone."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, TimeoutError):
        return APIError(
            504, "the request did not finish within warmserve.frontdoor.request-timeout"
        )
    if isinstance(e, WorkerLost):  # why it was lost (an engine's error) is the server's to see
        logger.warning("request %s: %s", request_id, e)
        return APIError(503, f"the instance serving request {request_id} was lost; retry")
    if isinstance(e, ValueError | TypeError):  # the engine refused the input
        return APIError(400, str(e))
    if isinstance(e, OSError):
        return APIError(503, f"no instance could serve the request: {e}")
    logger.error("request %s failed: %r", request_id, e, exc_info=e)
    return internal(request_id)


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

    def token(self, item: Choice | None) -> None:
        """Count a chunk: its tokens, and its prompt's once per prompt (the first of its n
        choices reports it), as vLLM's usage does."""
        if item is None:
            return
        index, chunk = item
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.door.metrics.ttft.labels(self.parsed.model).observe(now - self.received)
        if index % self.parsed.n == 0:
            self.prompt_tokens += chunk.prompt_tokens
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
        for choice in self.parsed.choices:
            self.door.done(model, choice.request_id)
        request_logger.debug("%s %s: %d tokens", self.parsed.request_id, status, self.tokens)


async def _events(
    shaper: Shaper,
    tracker: _Tracker,
    first: Choice | None,
    stream: AsyncIterator[Choice],
    deadline: float,
) -> AsyncIterator[bytes]:
    """Server-sent events of one streaming answer; the engine requests are cancelled (the
    stream closed) if the client goes away."""
    status = "200"
    try:
        for role in shaper.role_chunks(first[1].prompt_token_ids if first else None):
            yield sse(role)
        item = first
        while item is not None:
            yield sse(shaper.chunk(*item))
            async with asyncio.timeout_at(deadline):
                item = await anext(stream, None)
            tracker.token(item)
        if shaper.parsed.include_usage:
            yield sse(shaper.usage_chunk(tracker.prompt_tokens, tracker.tokens))
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        raise
    except Exception as e:
        error = _error_of(e, shaper.parsed.request_id)
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
