"""The front door's side of the cluster: its Dask client (reconnected when the scheduler comes
back), routing through the scheduler's ``warmserve_route`` (with the leases and the admission
queue), and the stream of a routed request from its worker over the channel to it, retried
elsewhere when an instance fails before its first token. :mod:`~warmserve.frontdoor.app` is the
HTTP side that uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from distributed import Client
from distributed.security import Security

from warmserve import protocol
from warmserve.frontdoor.admission import Admission
from warmserve.frontdoor.catalog import Catalog
from warmserve.frontdoor.errors import APIError
from warmserve.frontdoor.leases import Leases
from warmserve.frontdoor.metrics import Metrics
from warmserve.protocol import GenerateRequest, TokenChunk
from warmserve.worker_plugin.channel import Channels

logger = logging.getLogger("warmserve.frontdoor")

RECONNECT = 1.0  # seconds between looks at the scheduler connection (and new-client attempts)


class WorkerLost(Exception):
    """The worker or engine serving a request went away after tokens were already sent."""


class SchedulerFailed(Exception):
    """A scheduler handler raised. Its answers are statuses, so an exception there is our bug,
    whatever its type: a TypeError of the planner must not read as the client's bad input."""


@dataclass
class FrontDoor:
    """The front door's connection to the cluster, shared by the handlers of one app."""

    scheduler: str | Client
    catalog: Catalog
    max_queue: int
    retry_after: int
    request_timeout: float
    max_body: int
    lease_slots: int = 0
    security: Security | None = None
    metrics: Metrics = field(default_factory=Metrics)
    client: Client | None = None
    admission: Admission | None = None
    leases: Leases | None = None
    channels: Channels | None = None
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
        self._subscribe()
        self.leases = Leases(self._sync)
        self.leases.start()
        self.channels = Channels(protocol.WORKER_CHANNEL, self.client.connection_args)
        self.admission = Admission(
            self._route,
            self.max_queue,
            self.retry_after,
            self.metrics,
            self.leases,
            self.lease_slots,
        )
        logger.info("front door connected to %s", self.client.scheduler.address)

    async def _new_client(self, address: str, **options: Any) -> Client:
        return await Client(
            address,
            asynchronous=True,
            name="warmserve-frontdoor",
            security=self.security,
            **options,
        )

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
            self._subscribe()
            logger.info("front door reconnected to %s", address)

    def _subscribe(self) -> None:
        """Wake the waiting requests whenever the scheduler says memory or an instance changed."""
        assert self.client is not None
        self.client.subscribe_topic(protocol.SCHEDULER_CHANGED, self._on_changed)

    def _on_changed(self, event: tuple[float, str]) -> None:
        if self.admission is not None:
            self.admission.wake_all()

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
        if self.channels is not None:
            await self.channels.close()
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
        except Exception as e:
            raise SchedulerFailed(f"{protocol.SCHEDULER_ROUTE} raised {e!r}") from e

    async def _sync(self, events: list[list], returned: list[str], held: list[str]) -> dict:
        assert self.client is not None
        if self.client.status != "running":  # a call would wait for the connect timeout (30 s)
            raise self.away()
        return await getattr(self.client.scheduler, protocol.SCHEDULER_SYNC)(
            holder=self.client.id, events=events, returned=returned, held=held
        )

    def done(self, model: str, request_id: str) -> None:
        """Report the request over (in the next batch) and wake this model's queue."""
        assert self.admission is not None and self.leases is not None
        self.leases.finish(request_id)
        self.admission.wake(model)

    async def chunks(self, generate: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Tokens of ``generate`` from a routed instance, retrying elsewhere if an instance
        fails before its first token."""
        assert self.admission is not None and self.leases is not None
        assert self.channels is not None
        model = generate.model
        exclude: tuple[str, ...] = ()
        while True:
            route = await self.admission.admit(model, generate.request_id, exclude)
            self.metrics.running.labels(model).inc()
            sent = False
            try:
                chosen = replace(generate, instance=route.instance)
                stream = self.channels.generate(route.worker, chosen)
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
