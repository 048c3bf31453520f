"""Slots the scheduler leased to this front door, and the batched report of what ran on them.

A round trip to the scheduler per request (route, then done) was about half of what the front
door added to a request. So a route may come back with a lease: more slots on the instance it
chose, which this front door fills by itself while they last. The scheduler still decides
placement (it grants, and it ends the leases of an instance it stops or loses) and still sees
every request: arrivals on leased slots and every completion go to ``warmserve_sync`` in
batches, each with its age, so the load meters get the right times. One sync runs at a time, so
the scheduler applies the batches in the order the events happened.

A stale lease costs no correctness: a request sent to an instance that has gone fails before its
first token, and the front door retries it through a route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FLUSH = 0.02  # seconds a report waits for more events: one sync per this, not per request
CHECK = 0.5  # seconds between syncs while leases are held but unused (to learn revocations)
IDLE = 2.0  # seconds a lease may go unused before its free slots are given back

# (events, instances whose lease ends, instances whose lease is held) -> {"revoked": [...]}
SyncCall = Callable[[list[list], list[str], list[str]], Awaitable[dict]]


@dataclass(slots=True)
class Lease:
    """Slots of one instance held by this front door; ``busy`` of them serve requests."""

    model: str
    worker: str
    instance: str
    slots: int
    busy: int = 0
    used: float = 0.0  # loop time of the last request placed on it


class Leases:
    """This front door's leases by model, and the events not yet reported."""

    def __init__(self, sync: SyncCall) -> None:
        self._sync = sync
        self._by_model: defaultdict[str, dict[str, Lease]] = defaultdict(dict)
        self._events: list[list] = []  # [kind, ..., loop time]; the age replaces the time
        self._returned: set[str] = set()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Report what is pending and give every lease back."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for leases in self._by_model.values():
            for lease in list(leases.values()):
                self._give_back(lease)
        with contextlib.suppress(Exception):
            await self.flush()

    def held(self) -> dict[str, dict]:
        """Per instance: model, slots and busy slots (for status and tests)."""
        return {
            lease.instance: {"model": lease.model, "slots": lease.slots, "busy": lease.busy}
            for leases in self._by_model.values()
            for lease in leases.values()
        }

    # -- the request path ----------------------------------------------------------------------

    def take(self, model: str, request_id: str, exclude: tuple[str, ...]) -> Lease | None:
        """A free leased slot of ``model`` (on the instance with most free), or None."""
        best = None
        for lease in self._by_model.get(model, {}).values():
            if lease.busy >= lease.slots or lease.instance in exclude:
                continue
            if best is None or lease.slots - lease.busy > best.slots - best.busy:
                best = lease
        if best is not None:
            best.busy += 1
            best.used = self._loop.time()
            self._report(["arrive", request_id, model, best.instance, best.used])
        return best

    def add(self, model: str, worker: str, instance: str, slots: int) -> Lease:
        """A route granted ``slots`` on ``instance``; the routed request holds one of them."""
        lease = self._by_model[model].get(instance)
        if lease is None:
            lease = self._by_model[model][instance] = Lease(model, worker, instance, 0)
        lease.slots += slots
        lease.busy += 1
        lease.used = self._loop.time()
        self._wake.set()
        return lease

    @staticmethod
    def release(lease: Lease) -> None:
        """A request on a slot of ``lease`` stopped running: the slot is free (if the lease has
        ended meanwhile, that changes nothing)."""
        lease.busy -= 1

    def finish(self, request_id: str) -> None:
        """A request is over, whatever its outcome and wherever it ran: report it done."""
        self._report(["done", request_id, self._loop.time()])

    def drop(self, model: str, instance: str) -> None:
        """The instance failed a request: use it no more, and give its slots back."""
        lease = self._by_model.get(model, {}).get(instance)
        if lease is not None:
            self._give_back(lease)
            self._wake.set()

    async def flush(self) -> None:
        """Send the pending events and returns now (before a route that must come after them)."""
        async with self._lock:
            if not self._events and not self._returned and not any(self._by_model.values()):
                return
            now = self._loop.time()
            events = [[*e[:-1], max(0.0, now - e[-1])] for e in self._events]
            returned = self._returned
            held = [i for leases in self._by_model.values() for i in leases]
            self._events, self._returned = [], set()
            try:
                answer = await self._sync(events, sorted(returned), held)
            except BaseException:
                self._events[:0] = [[*e[:-1], now - e[-1]] for e in events]
                self._returned |= returned
                raise
        for iid in answer.get("revoked", ()):
            for leases in self._by_model.values():
                if leases.pop(iid, None) is not None:
                    logger.debug("lease on %s ended by the scheduler", iid)

    # -- internals -----------------------------------------------------------------------------

    def _report(self, event: list) -> None:
        self._events.append(event)
        self._wake.set()

    def _give_back(self, lease: Lease) -> None:
        """End ``lease``: its busy requests' completions no longer free a slot in it."""
        self._by_model[lease.model].pop(lease.instance, None)
        self._returned.add(lease.instance)

    def _give_back_idle(self) -> None:
        now = self._loop.time()
        for leases in self._by_model.values():
            for lease in list(leases.values()):
                if lease.busy == 0 and now - lease.used > IDLE:
                    self._give_back(lease)

    async def _run(self) -> None:
        """Sync every ``FLUSH`` while there is something to say, every ``CHECK`` while leases
        are held, and not at all otherwise. Losing the scheduler is logged once, not per try."""
        away = False
        while True:
            if not self._events and not self._returned:
                timeout = CHECK if any(self._by_model.values()) else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            await asyncio.sleep(FLUSH)
            self._give_back_idle()
            try:
                await self.flush()
            except Exception as e:  # the scheduler is away: stop using leases until it is back
                level = logging.DEBUG if away else logging.INFO
                logger.log(level, "cannot report to the scheduler (%s); leases given back", e)
                away = True
                for leases in self._by_model.values():
                    for lease in list(leases.values()):
                        self._give_back(lease)
                await asyncio.sleep(CHECK)
            else:
                away = False
