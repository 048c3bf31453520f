"""The WarmServe worker plugin: devices, weight store, engines and the handlers that drive them.

Everything a scheduler (or an operator) asks of a worker goes through handlers on the worker's
comm server (names in :mod:`warmserve.protocol`); they take and return plain dicts, lists and
strings so they travel as msgpack. What the worker has is reported three ways: the
``warmserve-device`` resource (count of devices), a ``"warmserve"`` entry in the heartbeat
metrics (``WorkerState.metrics["warmserve"]`` on the scheduler, the same dict as
``warmserve_status``), and events on the ``"warmserve"`` topic when something finishes or breaks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from distributed import Worker, WorkerPlugin
from distributed.core import Status, error_message
from tornado.ioloop import PeriodicCallback

from warmserve import options, protocol
from warmserve.policy.state import Tier
from warmserve.protocol import GenerateRequest, TokenChunk, fold
from warmserve.registry import ModelSpec, Registry, RegistryError
from warmserve.worker_plugin import channel, settings
from warmserve.worker_plugin.devices import Device, discover
from warmserve.worker_plugin.errors import (
    BadRequest,
    UnknownModel,
    WarmServeWorkerError,
    WorkerClosing,
)
from warmserve.worker_plugin.instances import EngineSlot, Instances
from warmserve.worker_plugin.jobs import Job, Jobs
from warmserve.worker_plugin.weight_store import WeightStore

logger = logging.getLogger("warmserve.worker")

NAME = protocol.WORKER_TOPIC  # plugin name on the worker, metrics key and event topic
RESOURCE = "warmserve-device"
KEEP_DEATHS = 32


def answers_errors(handler):
    """Wrap a handler so that the errors a caller can act on go back as its answer.

    Dask logs every exception a handler raises with its traceback, so an expected answer
    (a prewarm that does not fit, an unknown model, a worker that is closing) filled the
    worker's log with tracebacks. Returned as Dask's ``uncaught-error`` message instead, the
    caller's ``rpc`` raises the same exception, and nothing is logged here; any other
    exception still propagates and is logged as the bug it is."""

    @functools.wraps(handler)
    async def answer(**kwargs: object) -> object:
        try:
            return await handler(**kwargs)
        except WarmServeWorkerError as e:
            return error_message(e, status="uncaught-error")

    return answer


def rejoin_after_scheduler_loss(worker: Worker) -> None:
    """Make a lost scheduler connection end this worker process only, not its nanny.

    Dask closes a worker and its nanny when the scheduler's stream breaks (a worker cannot
    register twice). Closed alone, the worker exits as if it had crashed, and its nanny starts a
    new one, which waits for the scheduler's address to listen again and registers: a restarted
    scheduler gets its devices back. Engines do not survive that (they live in the worker
    process); the new worker reports empty devices and the planner starts from there. A
    deliberate scheduler shutdown still closes the nanny, as its ``close`` message comes first.
    Must run before the worker registers (in the preload), when it takes the stream.
    """

    async def handle_scheduler(comm) -> None:
        try:
            await worker.handle_stream(comm)
        finally:
            await worker.close(nanny=False, reason="warmserve-scheduler-lost")

    worker.handle_scheduler = handle_scheduler


def parse_tier(tier: str | int) -> Tier:
    """``"host"``, ``"device"``, ``"engine"`` (any case) or the Tier's number."""
    try:
        return Tier[tier.upper()] if isinstance(tier, str) else Tier(tier)
    except (KeyError, ValueError):
        raise BadRequest(f"unknown tier {tier!r}") from None


class WarmServeWorker(WorkerPlugin):
    """Owns one worker's devices. Built by ``dask_setup`` or registered by a client.

    ``devices``, ``node`` and ``device_memory`` are the preload flags (None: discover, see
    :func:`warmserve.worker_plugin.devices.discover`); ``registry`` is a registry YAML path
    (None: ``<warmserve.models-dir>/registry.yaml``). ``pinned``: the preload pinned the process
    to the one GPU of ``devices`` (:func:`warmserve.worker_plugin.devices.pin_cuda`); a plugin
    registered from a client comes too late for that and leaves ``CUDA_VISIBLE_DEVICES`` alone.
    """

    idempotent = True
    name = NAME

    def __init__(
        self,
        devices: str | None = None,
        node: str | None = None,
        device_memory: str | int | None = None,
        registry: str | None = None,
        pinned: bool = False,
    ) -> None:
        self._args = (devices, node, device_memory, pinned)
        # Resolved here: a plugin registered from a client names a path in the client's folder.
        self._registry_path = registry and os.path.abspath(registry)

    # --- lifecycle --------------------------------------------------------------------------

    async def setup(self, worker: Worker) -> None:
        self.worker = worker
        self._closing_now = False
        self.devices: list[Device] = discover(*self._args)
        self.node = self.devices[0].node
        self._registry_path = options.registry_file(self._registry_path)
        self._registry_mtime = -1.0
        self.registry = Registry()
        self._load_registry()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="warmserve")
        self.store = WeightStore(self.devices, settings.get_bytes("host-memory"), self._blocking)
        self.instances = Instances(
            self.store,
            self._blocking,
            settings.get_bytes("engine-kv"),
            settings.get_seconds("liveness-interval"),
            self._engine_died,
        )
        self.instances.preload()
        self.jobs = Jobs(self._job_finished)
        self.deaths: list[dict] = []
        self._handlers = {
            protocol.WORKER_PREWARM: answers_errors(self.prewarm),
            protocol.WORKER_EVICT: answers_errors(self.evict),
            protocol.WORKER_ACTIVATE: answers_errors(self.activate),
            protocol.WORKER_DEACTIVATE: answers_errors(self.deactivate),
            protocol.WORKER_STATUS: self.status,
            protocol.WORKER_CHANNEL: self.channel,
        }
        worker.handlers.update(self._handlers)
        worker.metrics[NAME] = lambda _worker: self.status()
        self._liveness = PeriodicCallback(
            self.instances.check, settings.get_seconds("liveness-interval") * 1000
        )
        self._liveness.start()
        if worker.status == Status.running:
            await worker.set_resources(**{RESOURCE: len(self.devices)})
        else:  # a preload runs before the worker registers, and registering sends these
            worker.state.total_resources[RESOURCE] = len(self.devices)
            worker.state.available_resources[RESOURCE] = len(self.devices)
        logger.info(
            "WarmServe worker on %s: %s", self.node, ", ".join(f"{d.id}" for d in self.devices)
        )

    async def teardown(self, worker: Worker) -> None:
        # Until the worker stops listening, the scheduler (which has not yet seen it leave) may
        # still send work: every handler now answers that the worker is closing, a NoInstance
        # the callers already handle, instead of Dask's "no handler" traceback.
        worker.handlers.update(dict.fromkeys(self._handlers, answers_errors(self._closing)))
        worker.handlers[protocol.WORKER_STATUS] = self._closing_status
        worker.handlers[protocol.WORKER_CHANNEL] = self.channel  # open ones answer till closed
        self._closing_now = True
        self._liveness.stop()
        await self.jobs.close()
        # A worker under a nanny closes only to end its process: engines need not free memory.
        exiting = worker.nanny is not None and worker.status != Status.running
        await self.instances.close(release=not exiting)
        self.store.close()
        self._pool.shutdown(wait=False)
        worker.metrics.pop(NAME, None)

    async def _closing(self, **kwargs: object) -> None:
        raise WorkerClosing(f"worker {self.worker.address} is closing")

    def _closing_status(self) -> dict:
        # A status request is no error (the scheduler asks every tick): it learns the worker
        # is leaving, which it may not have heard yet if teardown held this worker's loop.
        return {"closing": True}

    def _blocking(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _load_registry(self) -> None:
        """(Re)read the registry when its file changed: models may be made after start."""
        try:
            mtime = os.stat(self._registry_path).st_mtime
        except OSError:
            return
        if mtime != self._registry_mtime:
            try:
                self.registry = Registry.from_yaml(self._registry_path)
                self._registry_mtime = mtime
            except RegistryError:
                logger.exception("cannot read registry %s", self._registry_path)

    def spec(self, model: str) -> ModelSpec:
        if model not in self.registry:
            self._load_registry()
        try:
            return self.registry[model]
        except KeyError:
            raise UnknownModel(f"model {model!r} is not in {self._registry_path}") from None

    def _devices(self, devices: list[str] | str | None) -> list[str]:
        ids = [d.id for d in self.devices]
        if devices is None:
            return ids
        devices = [devices] if isinstance(devices, str) else list(devices)
        unknown = [d for d in devices if d not in ids]
        if unknown:
            raise BadRequest(f"devices {unknown} are not on this worker ({ids})")
        return devices

    # --- handlers ---------------------------------------------------------------------------

    async def prewarm(
        self,
        model: str,
        tier: str | int = "device",
        devices: list[str] | None = None,
        wait: bool = False,
    ) -> dict:
        """Move ``model`` up to ``tier`` (host, device or engine) in the background.

        ``devices`` defaults to one device: where it already is, else where an engine of its
        family is up, else the one with most free memory. Returns the job (state ``running``)
        at once, or its final state if ``wait``. An eviction of the model cancels the job.
        """
        spec = self.spec(model)
        target = parse_tier(tier)
        if target not in (Tier.HOST, Tier.DEVICE, Tier.ENGINE):
            raise BadRequest(f"prewarm goes to host, device or engine, not {target.name.lower()}")
        chosen = [] if target == Tier.HOST else self._prewarm_devices(spec, devices)
        job = self.jobs.start(model, target.name.lower(), chosen, self._prewarm_work(spec, target))
        if wait:
            await asyncio.wait([job.task])
        return job.to_dict()

    def _prewarm_devices(self, spec: ModelSpec, devices: list[str] | None) -> list[str]:
        if devices is not None:
            return self._devices(devices)
        ids = self._devices(None)
        mem = self.store.memory
        return [
            max(
                ids,
                key=lambda d: (
                    spec.name in mem[d].resident,
                    self.instances.idle_slot(spec, d) is not None,
                    mem[d].free_bytes,
                ),
            )
        ]

    def _prewarm_work(self, spec: ModelSpec, target: Tier):
        async def work(job: Job) -> None:
            if target == Tier.HOST:
                await self.store.to_host(spec, job.cancel)
                return
            await asyncio.gather(*(self.store.to_device(spec, d, job.cancel) for d in job.devices))
            if target == Tier.ENGINE:
                for d in job.devices:
                    async with self.instances.device_lock(d):
                        # The planner charges one engine per family and device: one of the
                        # family there, serving or not, is the tier it asked for. A second
                        # engine (weights, KV and runtime again) is memory it did not charge,
                        # which an activation makes room for; started here, it failed to fit
                        # on a GPU and the planner asked again at every tick.
                        if not self.instances.slots(d, spec.family):
                            await self.instances.start_engine(spec, d, keep=spec.name)

        return work

    def _job_finished(self, job: Job) -> None:
        # A prewarm that worked is the planner's routine (often of a model already there): the
        # console's INFO lines are for starts, activations and evictions.
        level = logging.DEBUG if job.state == "done" else logging.WARNING
        reason = f" ({job.error})" if job.error else ""
        logger.log(
            level,
            "prewarm %s to %s on %s: %s%s",
            job.model,
            job.tier,
            job.devices,
            job.state,
            reason,
        )
        self.worker.log_event(NAME, {"event": "prewarm", **job.to_dict()})

    async def evict(
        self, model: str, devices: list[str] | None = None, tier: str | int = "host"
    ) -> dict:
        """Drop ``model``'s weights from ``devices`` (default all), down to ``tier``.

        ``tier`` ``"host"`` keeps the host-memory copy; ``"disk"`` drops it too. Running
        prewarms of the model are cancelled first. An instance of the model keeps serving (its
        engine holds its own copy of the weights).
        """
        spec = self.spec(model)
        target = parse_tier(tier)
        if target not in (Tier.DISK, Tier.HOST):
            raise BadRequest(f"evict goes down to host or disk, not {target.name.lower()}")
        cancelled = await self.jobs.cancel(model)
        evicted = []
        for d in self._devices(devices):
            async with self.instances.device_lock(d):
                if self.store.drop_device(spec.name, d):
                    evicted.append(d)
        host = target == Tier.DISK and self.store.drop_host(spec.name)
        if evicted or host:
            logger.info("evicted %s from %s (host copy dropped: %s)", model, evicted, bool(host))
        return {
            "model": model,
            "devices": evicted,
            "host_dropped": bool(host),
            "cancelled": [j.id for j in cancelled],
        }

    async def activate(self, model: str, device: str | None = None) -> str:
        """Start an instance of ``model`` from the warmest tier there is; return its id.

        The ``"activated"`` event says which tier it started from and how long it took.
        A device may serve several instances (of different models) as long as its memory holds
        their engines. Raises DeviceBusy when every candidate device already serves an instance
        of ``model`` and DoesNotFit when no eviction on the device makes room for an engine.
        """
        spec = self.spec(model)
        if spec.tp != 1:
            raise BadRequest(f"{model}: tensor parallelism {spec.tp} is not supported here")
        candidates = self._devices(device)
        start = time.perf_counter()
        chosen = self.instances.pick_device(spec, candidates)
        async with self.instances.device_lock(chosen):
            tier = self.instances.tier(spec, chosen)
            instance = await self.instances.activate(spec, chosen)
        seconds = time.perf_counter() - start
        logger.info("activated %s on %s from %s in %.3f s", model, chosen, tier.name, seconds)
        self.worker.log_event(
            NAME,
            {
                "event": "activated",
                "from_tier": tier.name.lower(),
                "seconds": seconds,
                **instance.to_dict(),
            },
        )
        return instance.id

    async def deactivate(self, instance: str) -> dict:
        """Stop serving ``instance``; its engine stays up with the model (tier engine)."""
        inst = await self.instances.deactivate(instance)
        self.worker.log_event(NAME, {"event": "deactivated", **inst.to_dict()})
        return {"instance": inst.id, "model": inst.model, "device": inst.device}

    def status(self) -> dict:
        """Devices, what sits on them, host cache, instances, prewarm jobs and engine deaths."""
        devices = []
        for d in self.devices:
            mem = self.store.memory[d.id]
            slots = self.instances.slots(d.id)
            devices.append(
                {
                    "id": d.id,
                    "node": d.node,
                    "kind": d.kind,
                    "memory": d.memory,
                    "free": mem.free_bytes,
                    "resident": self.store.resident_on(d.id),
                    # family -> model: an idle engine's if the family has one (what a switch
                    # starts from), else a serving one's; every engine is in "engine_slots".
                    "engines": {
                        s.family: s.model for s in sorted(slots, key=lambda s: s.instance is None)
                    },
                    "engine_slots": [
                        {"family": s.family, "model": s.model, "instance": s.instance}
                        for s in slots
                    ],
                    "instances": [s.instance for s in slots if s.instance],
                    "lent": 0,
                }
            )
        return {
            "worker": self.worker.address,
            "node": self.node,
            "devices": devices,
            "host": {"budget": self.store.host.budget, "used": self.store.host.used_bytes},
            "host_cache": self.store.host_models(),
            "instances": [i.to_dict() for i in self.instances.instances.values()],
            "jobs": self.jobs.to_list(),
            "deaths": list(self.deaths),
        }

    # --- requests ---------------------------------------------------------------------------

    async def complete(self, req: GenerateRequest) -> TokenChunk:
        """Run ``req`` to the end on an instance of its model: one chunk with all the output."""
        chunks = [chunk async for chunk in self.instances.generate(req)]
        return fold(chunks) if chunks else TokenChunk("", [])

    async def channel(self, comm, **kwargs: object) -> None:
        """A front door's channel: the requests it streams here, until it closes
        (:mod:`warmserve.worker_plugin.channel`)."""
        await channel.serve(comm, self.generate)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """``req``'s output from an instance of its model; a closing worker takes none."""
        if self._closing_now:
            raise WorkerClosing(f"worker {self.worker.address} is closing")
        async for chunk in self.instances.generate(req):
            yield chunk

    def _engine_died(self, slot: EngineSlot, lost: list[str], reason: str) -> None:
        event = {
            "event": "engine-died",
            "device": slot.device,
            "family": slot.family,
            "instances": lost,
            "reason": reason,
            "time": time.time(),
        }
        self.deaths = [*self.deaths[-KEEP_DEATHS + 1 :], event]
        self.worker.log_event(NAME, event)
