"""Admission control: per-model FIFO queues in front of the scheduler's routing.

The scheduler decides where a request goes and counts each instance's slots, so several front
doors share one view of capacity. When it answers that no instance has room, the request waits
here, in arrival order, up to ``warmserve.frontdoor.max-queue`` per model; beyond that it is
answered 429 with ``Retry-After``. Only the head of a queue asks the scheduler again (when a request
of its model finishes here, when the scheduler announces that an instance went idle or started,
so that memory may be free for any model, or every ``POLL`` seconds as a fallback), so a long
queue does not become a storm of RPCs. A free slot of a lease this front door holds
(:mod:`~warmserve.frontdoor.leases`) is taken before asking, in the same order, so leasing
changes how fast a request is placed, not which request goes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from warmserve.frontdoor.errors import APIError
from warmserve.frontdoor.leases import Lease, Leases
from warmserve.frontdoor.metrics import Metrics

logger = logging.getLogger(__name__)

POLL = 0.25  # seconds between the queue head's retries when nothing was heard


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request runs: the worker holding the instance, the instance, and the lease of
    this front door the slot belongs to, if any."""

    worker: str
    instance: str
    lease: Lease | None = None


# (model, request_id, exclude, slots to lease) -> the scheduler's answer
RouteCall = Callable[[str, str, tuple[str, ...], int], Awaitable[dict]]


class Admission:
    """Turns the scheduler's route answers into a route, a wait in line, or a 429."""

    def __init__(
        self,
        route: RouteCall,
        max_queue: int,
        retry_after: int,
        metrics: Metrics,
        leases: Leases | None = None,
        lease_slots: int = 0,
    ) -> None:
        self._route = route
        self.leases = leases
        self.lease_slots = lease_slots if leases is not None else 0
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._metrics = metrics
        self._queues: defaultdict[str, deque[str]] = defaultdict(deque)
        # Set (and replaced) when something changed for a model; its waiters then look again.
        self._changed: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

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
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed[model].wait(), POLL)
                if queue[0] == request_id:
                    route = await self._try(model, request_id, exclude)
                    if route:
                        return route
        finally:
            queue.remove(request_id)
            self._metrics.queued.labels(model).set(len(queue))
            self.wake(model)

    def wake(self, model: str) -> None:
        """Something changed for ``model`` (a request finished, the queue head left): wake."""
        changed = self._changed.pop(model, None)
        if changed is not None:
            changed.set()

    def wake_all(self) -> None:
        """Memory may have become free for any model (an instance went idle somewhere): every
        waiting queue's head asks again now, not at its next poll."""
        for model, queue in self._queues.items():
            if queue:
                self.wake(model)

    async def _try(self, model: str, request_id: str, exclude: tuple[str, ...]) -> Route | None:
        if self.leases is not None:
            lease = self.leases.take(model, request_id, exclude)
            if lease is not None:
                return Route(lease.worker, lease.instance, lease)
        try:
            answer = await self._route(model, request_id, exclude, self.lease_slots)
        except OSError as e:
            raise APIError(503, f"the scheduler cannot be reached: {e}") from None
        status = answer.get("status")
        if status == "ok":
            granted = int(answer.get("lease", 0))
            lease = None
            if granted and self.leases is not None:
                lease = self.leases.add(model, answer["worker"], answer["instance"], granted)
            return Route(answer["worker"], answer["instance"], lease)
        if status == "unknown":
            raise APIError(404, f"The model `{model}` does not exist.", param="model")
        if status != "queued":
            raise APIError(
                503,
                f"the scheduler cannot place {model}: {answer.get('reason')}",
                headers={"Retry-After": str(self.retry_after)},
            )
        return None
