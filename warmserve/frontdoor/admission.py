"""Admission control: per-model FIFO queues in front of the scheduler's routing.

The scheduler decides where a request goes and counts each instance's slots, so several front
doors share one view of capacity. When it answers that no instance has room, the request waits
here, in arrival order, up to ``warmserve.frontdoor.max-queue`` per model; beyond that it is
answered 429 with ``Retry-After``. Only the head of a queue asks the scheduler again (when a request
of its model finishes here, or every ``POLL`` seconds for room freed elsewhere), so a long queue
does not become a storm of RPCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from warmserve.frontdoor.errors import APIError
from warmserve.frontdoor.metrics import Metrics

logger = logging.getLogger(__name__)

POLL = 0.25  # seconds between the queue head's retries when nothing finished here


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request runs: the worker holding the instance, and the instance."""

    worker: str
    instance: str


RouteCall = Callable[[str, str, tuple[str, ...]], Awaitable[dict]]


class Admission:
    """Turns the scheduler's route answers into a route, a wait in line, or a 429."""

    def __init__(self, route: RouteCall, max_queue: int, retry_after: int, metrics: Metrics):
        self._route = route
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._metrics = metrics
        self._queues: defaultdict[str, deque[str]] = defaultdict(deque)
        self._changed: defaultdict[str, asyncio.Condition] = defaultdict(asyncio.Condition)

    def depth(self, model: str) -> int:
        return len(self._queues[model])

    async def admit(self, model: str, request_id: str, exclude: tuple[str, ...] = ()) -> Route:
        """A route for the request, after waiting in ``model``'s queue if it must."""
        queue = self._queues[model]
        if not queue:
            route = await self._try(model, request_id, exclude)
            if route:
                return route
        if len(queue) >= self.max_queue:
            raise APIError(
                429,
                f"{model} is overloaded: {len(queue)} requests are waiting; retry later",
                headers={"Retry-After": str(self.retry_after)},
            )
        queue.append(request_id)
        self._metrics.queued.labels(model).set(len(queue))
        logger.debug("%s queued for %s at depth %d", request_id, model, len(queue))
        changed = self._changed[model]
        try:
            while True:
                async with changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), POLL)
                if queue[0] == request_id:
                    route = await self._try(model, request_id, exclude)
                    if route:
                        return route
        finally:
            queue.remove(request_id)
            self._metrics.queued.labels(model).set(len(queue))
            await self.release(model)

    async def release(self, model: str) -> None:
        """Something changed for ``model`` (a request finished, the queue head left): wake."""
        changed = self._changed[model]
        async with changed:
            changed.notify_all()

    async def _try(self, model: str, request_id: str, exclude: tuple[str, ...]) -> Route | None:
        try:
            answer = await self._route(model, request_id, exclude)
        except OSError as e:
            raise APIError(503, f"the scheduler cannot be reached: {e}") from None
        status = answer.get("status")
        if status == "ok":
            return Route(answer["worker"], answer["instance"])
        if status == "unknown":
            raise APIError(404, f"The model `{model}` does not exist.", param="model")
        if status != "queued":
            raise APIError(503, f"the scheduler cannot place {model}: {answer.get('reason')}")
        return None
