"""Engines and instances on a worker's devices: activation, in-place switching, liveness.

Engines (``warmserve.engine.Engine``, in this process) run on a device, each of one family; an
instance is an engine serving one model for the scheduler. A device hosts as many instances as
its memory holds engines (the ``share`` baseline puts two on each), at most one per model.
Activation starts from the warmest tier there is: an idle engine of the family switches in place
to weights from the device pool (or host memory, or disk); otherwise an engine starts, after
evicting prewarmed weights of other models, and then idle engines, from that device only as far
as its memory demands. Engines serving an instance are never stopped to make room.

A dead engine (its thread ended, found by the periodic check or by a failed request) is shut
down, its instances dropped and its memory returned, and reported through ``on_death``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from dask.utils import parse_bytes

from warmserve import config
from warmserve.engine.engine import Engine, EngineConfig, EngineError, weight_bytes
from warmserve.engine.engine import preload as preload_engine
from warmserve.policy.state import Tier
from warmserve.protocol import GenerateRequest, TokenChunk
from warmserve.registry import ModelSpec
from warmserve.worker_plugin.errors import (
    DeviceBusy,
    DeviceTooSmall,
    DoesNotFit,
    EngineDied,
    NoInstance,
)
from warmserve.worker_plugin.weight_store import WeightStore

logger = logging.getLogger("warmserve.worker.instances")

DRAIN_POLL_S = 0.005  # how often a switch waiting for an idle engine to drain looks again
DRAIN_INTERVALS = 10  # liveness intervals it waits at most


@dataclass(eq=False)
class EngineSlot:
    """An engine of ``family`` up on ``device``; ``instance`` is set while it serves one.

    ``key`` names the engine in the worker and in the device's memory ledger: a device may run
    several engines, of one family or of several.
    """

    key: str
    device: str
    family: str
    engine: Engine
    instance: str | None = None
    started: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    # Requests routed to the engine and not yet over, counted from the moment they are routed:
    # the engine counts a request only once its thread has added it, a moment later.
    requests: int = 0

    @property
    def model(self) -> str:
        return self.engine.model.name


@dataclass(eq=False)
class Instance:
    id: str
    model: str
    device: str
    slot: EngineSlot
    started: float = field(default_factory=time.time)
    in_flight: int = 0

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "device": self.device,
            "family": self.slot.family,
            "started": self.started,
            "in_flight": self.in_flight,
        }


def _log_preload(future: asyncio.Future) -> None:
    if future.cancelled():
        return
    if future.exception() is not None:
        logger.error("importing vLLM failed", exc_info=future.exception())
    else:
        logger.debug("vLLM imported")


class Instances:
    """The engines and instances of one worker. Runs on the worker's event loop."""

    def __init__(
        self,
        store: WeightStore,
        run_blocking: Callable,
        kv_bytes: int,
        liveness_interval: float,
        on_death: Callable[[EngineSlot, list[str], str], None],
    ) -> None:
        self.store = store
        self._run_blocking = run_blocking
        # The front door bounds prompt + max_tokens by the same key (warmserve.frontdoor.catalog).
        self._engine_config = EngineConfig(
            kv_cache_bytes=kv_bytes,
            max_model_len=int(config.get("engine.max-model-len")),
            dtype=str(config.get("engine.dtype")),
        )
        self._overhead = int(parse_bytes(config.get("planner.engine-bytes") or 0))
        self._policy = config.policy_config()  # engines take the requests its capacity says
        self._interval = liveness_interval
        self._on_death = on_death
        # Instance ids are ``device/model/<token><n>``: the token differs per process, so ids
        # from before a worker restart never name a new instance.
        self._token = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._engine_ids = itertools.count(1)
        self.engines: dict[str, EngineSlot] = {}  # by EngineSlot.key
        self.instances: dict[str, Instance] = {}
        self._device_locks = {d: asyncio.Lock() for d in store.memory}
        # vLLM builds one engine at a time in a process (it sets process-wide state while
        # it does); switches on other engines go on meanwhile.
        self._start_lock = asyncio.Lock()
        self._preloaded: asyncio.Future | None = None

    def preload(self) -> None:
        """Start importing vLLM in the background (``warmserve.engine.engine.preload``), so the
        first engine of this worker does not pay for it; engine starts wait for it."""
        if self._preloaded is None:
            self._preloaded = asyncio.ensure_future(self._run_blocking(preload_engine))
            self._preloaded.add_done_callback(_log_preload)

    def device_lock(self, device: str) -> asyncio.Lock:
        return self._device_locks[device]

    def slots(self, device: str, family: str | None = None) -> list[EngineSlot]:
        """The engines on ``device`` (of ``family`` if given), oldest first."""
        return [
            s
            for s in self.engines.values()
            if s.device == device and (family is None or s.family == family)
        ]

    def idle_slot(self, spec: ModelSpec, device: str) -> EngineSlot | None:
        """An engine of ``spec``'s family on ``device`` serving no instance: one that already
        holds ``spec`` if there is one, else the most recently used."""
        idle = [s for s in self.slots(device, spec.family) if s.instance is None]
        return max(idle, key=lambda s: (s.model == spec.name, s.last_used), default=None)

    def serves(self, model: str, device: str) -> bool:
        """Whether an instance of ``model`` runs on ``device``."""
        return any(i.model == model and i.device == device for i in self.instances.values())

    def tier(self, spec: ModelSpec, device: str) -> Tier:
        """Where an activation of ``spec`` on ``device`` would start from. ENGINE: an idle
        engine of the family is up there (the start is a switch in place, or nothing)."""
        if self.serves(spec.name, device):
            return Tier.ACTIVE
        if self.idle_slot(spec, device) is not None:
            return Tier.ENGINE
        if spec.name in self.store.resident_on(device):
            return Tier.DEVICE
        if spec.name in self.store.host_models():
            return Tier.HOST
        return Tier.DISK

    def engine_bytes(self, spec: ModelSpec) -> int:
        """What an engine of ``spec``'s family takes on its device: its weights as it computes
        with them (a bf16 checkpoint run in float32 on a CPU takes twice its file), its KV
        cache, and ``warmserve.planner.engine-bytes`` besides (runtime context, activation
        workspace, CUDA graphs: about 2 GB for an 8B model on a GPU), the figure the planner
        charges per engine, so the two ledgers agree."""
        weights = weight_bytes(spec.nbytes, spec.path, self._engine_config.dtype)
        return weights + self._engine_config.kv_cache_bytes + self._overhead

    def engine_config(self, spec: ModelSpec, device: str) -> EngineConfig:
        """How an engine for ``spec`` starts on ``device``: ``max_num_seqs`` is the capacity the
        scheduler gives an instance there (``PolicyConfig.capacity`` on the memory this worker
        reports for the device), so vLLM batches as many requests as the scheduler routes."""
        memory = self.store.memory[device].device.memory
        slots = max(self._policy.capacity(spec, memory), 1)
        return replace(self._engine_config, max_num_seqs=slots)

    # --- activation -------------------------------------------------------------------------

    def pick_device(self, spec: ModelSpec, devices: list[str]) -> str:
        """The device where ``spec`` is warmest and that serves no instance of it yet.

        An idle engine already holding the model counts most, then an idle engine of its family,
        then its weights in the device pool, then fewer instances, then free memory.
        """
        free = [d for d in devices if not self.serves(spec.name, d)]
        if not free:
            raise DeviceBusy(f"every device of {devices} already serves {spec.name}")

        def warmth(d: str) -> tuple:
            slot = self.idle_slot(spec, d)
            return (
                slot is not None and slot.model == spec.name,
                slot is not None,
                spec.name in self.store.resident_on(d),
                -sum(i.device == d for i in self.instances.values()),
                self.store.memory[d].free_bytes,
            )

        return max(free, key=warmth)

    async def activate(self, spec: ModelSpec, device: str) -> Instance:
        """Start an instance of ``spec`` on ``device`` (which the caller picked and locked).

        Other instances on the device go on serving; a new engine is started when no idle one
        of the family is there (DoesNotFit if the device's memory cannot take it).
        """
        if self.serves(spec.name, device):
            raise DeviceBusy(f"{device} already serves {spec.name}")
        for dead in [s for s in self.slots(device, spec.family) if not s.engine.alive()]:
            await self._bury(dead, "engine found dead at activation")
        slot = self.idle_slot(spec, device)
        if slot is None:
            slot = await self.start_engine(spec, device, keep=spec.name)
        elif slot.model != spec.name:
            await self._drained(slot)
            weights = self.store.weights(spec.name, device)
            switch = await self._run_blocking(slot.engine.switch, spec, weights)
            logger.debug(
                "%s: switched to %s in %.3f s (%s)",
                *(device, spec.name, switch.seconds, switch.method),
            )
        instance = Instance(
            f"{device}/{spec.name}/{self._token}{next(self._ids)}", spec.name, device, slot
        )
        slot.instance = instance.id
        slot.last_used = time.monotonic()
        self.instances[instance.id] = instance
        return instance

    async def _drained(self, slot: EngineSlot) -> None:
        """Wait until an idle engine has let its last requests go, so it can switch.

        The scheduler stops an instance once its requests are done at the front door, which can
        be a moment before the engine has finished or aborted them; a switch then would raise
        ``EngineBusy`` (seen on a GPU under replay). A front door may also send a request on a
        lease the scheduler has just ended (it stopped the instance as idle): routed here before
        the deactivation, it is not yet in the engine, which adds it on its own thread, so the
        engine's count alone let the switch go first (EngineBusy at the switch, seen in the soak
        at 16 requests/s; or, had the switch been queued before the request, the request
        served by the new model). Both counts must be zero. No new request
        reaches an engine without an instance, so this ends when they finish; DeviceBusy (the
        scheduler retries) if they do not within ``DRAIN_INTERVALS`` liveness intervals.
        """
        deadline = time.monotonic() + DRAIN_INTERVALS * self._interval
        while slot.requests or slot.engine.in_flight:
            if time.monotonic() > deadline:
                raise DeviceBusy(
                    f"{slot.device}: the idle engine of {slot.family} still has "
                    f"{max(slot.requests, slot.engine.in_flight)} requests in flight"
                )
            await asyncio.sleep(DRAIN_POLL_S)

    async def start_engine(self, spec: ModelSpec, device: str, keep: str) -> EngineSlot:
        """An idle engine of ``spec``'s family on ``device``: the one there is, else a new one,
        making room for it if memory demands.

        Room comes from prewarmed weights of other models than ``keep`` (least recently used
        first), then from idle engines; if that is still not enough, nothing is dropped and
        DoesNotFit is raised (DeviceTooSmall if the engine exceeds the whole device).
        """
        slot = self.idle_slot(spec, device)
        if slot is not None:
            return slot
        memory = self.store.memory[device]
        need = self.engine_bytes(spec)
        await self._make_room(spec, device, need, keep)
        key = f"{device}/{spec.family}#{next(self._engine_ids)}"
        memory.reserve_engine(key, need)
        try:
            async with self._start_lock:
                if self._preloaded is not None:
                    await asyncio.wait([self._preloaded])  # a failed preload: the start says why
                engine = await self._run_blocking(Engine, spec, self.engine_config(spec, device))
        except BaseException:
            memory.release_engine(key)
            raise
        slot = EngineSlot(key, device, spec.family, engine)
        self.engines[key] = slot
        logger.info("%s: engine %s up with %s", device, key, spec.name)
        return slot

    async def _make_room(self, spec: ModelSpec, device: str, need: int, keep: str) -> None:
        memory = self.store.memory[device]
        if memory.fits(need):
            return
        if memory._chunks(need) > memory.pool.capacity:
            raise DeviceTooSmall(
                f"{device}: an engine of {spec.family} needs {memory._chunks(need)} bytes "
                f"(weights and warmserve.worker.engine-kv), more than the device's "
                f"{memory.pool.capacity}"
            )
        weights = sorted(
            (r for m, r in memory.resident.items() if m != keep and r.filled),
            key=lambda r: r.last_used,
        )
        idle = sorted(
            (s for s in self.slots(device) if s.instance is None), key=lambda s: s.last_used
        )
        freeable = sum(memory._chunks(r.layout.nbytes) for r in weights)
        freeable += sum(memory.engines[s.key] for s in idle)
        if memory.free_bytes + freeable < memory._chunks(need):
            raise DoesNotFit(memory._no_room(f"engine of {spec.family}", need))
        for resident in weights:
            if memory.fits(need):
                return
            logger.debug("%s: evicting %s for an engine of %s", device, resident.model, spec.family)
            memory.drop_weights(resident.model)
        for slot in idle:
            if memory.fits(need):
                return
            logger.info("%s: stopping idle engine %s for %s", device, slot.key, spec.family)
            await self._stop(slot)

    async def deactivate(self, instance_id: str) -> Instance:
        """Stop serving; the engine stays up, idle, with the model loaded (tier ENGINE)."""
        instance = self.instances.pop(instance_id, None)
        if instance is None:
            raise NoInstance(f"no instance {instance_id!r} on this worker")
        instance.slot.instance = None
        instance.slot.last_used = time.monotonic()
        return instance

    async def _stop(self, slot: EngineSlot) -> None:
        """Forget an engine, shut it down and give back its memory."""
        if self.engines.get(slot.key) is slot:
            del self.engines[slot.key]
        for iid in [i.id for i in self.instances.values() if i.slot is slot]:
            del self.instances[iid]
        try:
            await self._run_blocking(slot.engine.shutdown)
        except Exception:  # a dead engine may fail to shut down cleanly; it is gone either way
            logger.debug("%s: %s engine shutdown failed", slot.device, slot.family, exc_info=True)
        self.store.memory[slot.device].release_engine(slot.key)

    # --- requests ---------------------------------------------------------------------------

    def route(self, model: str, instance: str | None = None) -> Instance:
        """The instance ``instance`` (the scheduler's choice), or without one the least loaded
        instance of ``model`` here; NoInstance when there is none. A chosen instance that is
        gone (switched away since the scheduler chose it) is NoInstance too, not another one:
        the scheduler counts the request on the instance it chose, and the front door's retry
        asks it again."""
        if instance is not None:
            chosen = self.instances.get(instance)
            if chosen is None or chosen.model != model:
                raise NoInstance(f"instance {instance!r} of {model!r} is not on this worker")
            return chosen
        candidates = [i for i in self.instances.values() if i.model == model]
        if not candidates:
            raise NoInstance(f"no active instance of {model!r} on this worker")
        return min(candidates, key=lambda i: i.in_flight)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Stream ``req`` from an instance of its model; EngineDied if the engine dies meanwhile.

        While waiting for a token the engine's liveness is checked every liveness interval, so
        a request on an engine that dies without a word ends with an error, not a hang.
        """
        instance = self.route(req.model, req.instance)
        slot = instance.slot
        instance.in_flight += 1
        slot.requests += 1
        stream = slot.engine.generate(req)
        step: asyncio.Future | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                while not step.done():
                    await asyncio.wait([step], timeout=self._interval)
                    if not step.done() and not slot.engine.alive():
                        await self._bury(slot, "engine died during a request")
                        raise EngineDied(f"engine of {slot.family} on {slot.device} died")
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    return
                except EngineError as e:
                    await self._bury(slot, str(e))
                    raise EngineDied(f"engine of {slot.family} on {slot.device}: {e}") from e
                yield chunk
        finally:
            instance.in_flight -= 1
            slot.requests -= 1
            if step is not None and not step.done():
                step.cancel()
                await asyncio.wait([step])
            await stream.aclose()

    # --- liveness ---------------------------------------------------------------------------

    async def check(self) -> list[EngineSlot]:
        """Find dead engines and bury them; called periodically."""
        dead = [s for s in self.engines.values() if not s.engine.alive()]
        for slot in dead:
            await self._bury(slot, "engine found dead by the liveness check")
        return dead

    async def _bury(self, slot: EngineSlot, reason: str) -> None:
        if self.engines.get(slot.key) is not slot:
            return  # already buried
        lost = [i.id for i in self.instances.values() if i.slot is slot]
        logger.warning("%s: %s engine died (%s); lost %s", slot.device, slot.family, reason, lost)
        await self._stop(slot)
        self._on_death(slot, lost, reason)

    async def close(self, release: bool = True) -> None:
        """Stop every engine; ``release``: free their memory now (see ``Engine.shutdown``)."""
        slots = list(self.engines.values())
        self.engines.clear()
        self.instances.clear()
        await asyncio.gather(
            *(self._run_blocking(s.engine.shutdown, release) for s in slots),
            return_exceptions=True,
        )
