"""The WarmServe scheduler extension: measures load, runs the policy, routes requests.

Shaped like ``distributed.active_memory_manager``: a ``PeriodicCallback`` runs one planning pass
every ``warmserve.planner.tick`` seconds (:meth:`run_once`), the policy returns typed actions,
and :meth:`enact` sends them to the workers' ``WORKER_*`` handlers without waiting (a failure is
logged and the worker's state is fetched again). Actions for one worker are sent in the order the
policy gave them (an eviction before the activation that needs its memory). Starts, stops and KV
lending enter :class:`~warmserve.scheduler_plugin.state.ClusterState` when accepted; prewarms and
evictions show up when the workers next report (each tick refreshes every worker first). Lending
has no worker handler (an engine's KV size is fixed when it starts), so it lives in the
accounting only.

Routing (``warmserve_route``) is the latency-critical path: it answers from the accounting alone
when an instance has room, and only when none has does it ask ``policy.on_demand`` and await the
activation it chose. A front door may ask for a *lease* with its route: more slots on the chosen
instance that it fills by itself, without a round trip per request. It reports what happened on
them (arrivals, completions, with their times) in batches through ``warmserve_sync``, whose answer
names the leases this scheduler ended (an instance stopping or lost), so placement stays decided
here and the load meters still see every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from distributed import Scheduler, SchedulerPlugin
from distributed.core import Status
from distributed.metrics import time
from tornado.ioloop import PeriodicCallback

from warmserve import protocol
from warmserve.policy.feasible import never_serve
from warmserve.policy.load import LoadMeter, ShortLoad
from warmserve.policy.state import (
    Action,
    DeviceSnapshot,
    Evict,
    LendKV,
    Policy,
    Prewarm,
    ReclaimKV,
    Start,
    Stop,
)
from warmserve.registry import Registry
from warmserve.scheduler_plugin.history import History
from warmserve.scheduler_plugin.state import ClusterState, Instance, Starting
from warmserve.worker_plugin.errors import DeviceBusy, DoesNotFit, WorkerClosing, arrived

logger = logging.getLogger("warmserve.scheduler")
action_logger = logging.getLogger("warmserve.scheduler.actions")

NAME = "warmserve"
DRAIN_POLL_S = 0.05  # how often a start waits on an instance draining on its devices


class WarmServeExtension(SchedulerPlugin):
    """Scheduler plugin holding WarmServe's state; installed by the preload or by hand."""

    name = NAME

    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        *,
        tick: float,
        window: float,
        average: float,
        history: History | None = None,
    ) -> None:
        self.registry = registry
        self.history = history  # the forecaster's, kept on disk across restarts
        self.policy = policy
        self.tick = tick
        self.state = ClusterState(registry, policy.config)
        self.meter = LoadMeter(window)  # forecaster's windows
        self.short = ShortLoad(average)  # the autoscaler's load
        self.scheduler: Scheduler | None = None
        self._pc: PeriodicCallback | None = None
        self._lanes: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task] = set()
        self._run_lock = asyncio.Lock()
        self._clock = 0.0  # time of the latest arrival or completion fed to the meters
        self._fit_devices: tuple[tuple[str, int], ...] = ()  # what _never was computed for
        self._never: dict[str, str] = {}
        self._prepared: asyncio.Future | None = None  # the policy's prepare(), in a thread

    # -- SchedulerPlugin hooks -----------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        if self.scheduler is not None:
            return
        self.scheduler = scheduler
        scheduler.handlers[protocol.SCHEDULER_ROUTE] = self.route
        scheduler.handlers[protocol.SCHEDULER_DONE] = self.done
        scheduler.handlers[protocol.SCHEDULER_SYNC] = self.sync
        scheduler.handlers[protocol.SCHEDULER_STATUS] = self.status
        scheduler.handlers[protocol.SCHEDULER_RUN_ONCE] = self.run_once
        scheduler.extensions[NAME] = self
        if self.history is not None:
            self.history.load()
        self._prepared = self._prepare()
        for address in scheduler.workers:
            self._spawn(self.refresh(address))
        self._pc = PeriodicCallback(self.run_once, self.tick * 1000.0)
        self._pc.start()
        logger.info(
            "WarmServe planner %s on %d models, tick %.1fs",
            self.policy.name,
            len(self.registry),
            self.tick,
        )

    def _prepare(self) -> asyncio.Future:
        """Run the policy's slow one-time work (numba compiling the forecaster: 30 to 40 s on 2
        cores without its disk cache) in a thread, so the event loop keeps routing meanwhile;
        the policy's first use waits for it (:meth:`_ready`). A daemon thread: a scheduler
        closed meanwhile does not wait for it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            t0 = time()
            try:
                self.policy.prepare()
                logger.debug("policy %s prepared in %.1f s", self.policy.name, time() - t0)
            except Exception:  # its first use then does the same work on the event loop
                logger.warning("preparing policy %s failed", self.policy.name, exc_info=True)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(finish)

        threading.Thread(target=run, name="warmserve-prepare", daemon=True).start()
        return done

    async def _ready(self) -> None:
        """Wait until the policy is prepared (at once, once it is)."""
        if self._prepared is not None and not self._prepared.done():
            await asyncio.shield(self._prepared)

    async def close(self) -> None:
        if self._pc is not None:
            self._pc.stop()
        for task in list(self._tasks):
            task.cancel()
        for s in self.state.starting:
            if not s.ready.done():
                s.ready.set_result(None)
        if self.history is not None:
            await self.history.save()

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self._spawn(self.refresh(worker))

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """A front door went away (closed, or killed mid-stream): its requests will never be
        reported done, so they end here and their slots are free again; so are its leases."""
        now = time()
        for request_id in self.state.requests_from(client):
            self._finish(request_id, now)
        self.state.drop_holder(client)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        lost = self.state.remove_worker(worker)
        self._lanes.pop(worker, None)
        if lost:
            logger.info("worker %s left with instances %s", worker, lost)

    # -- worker state --------------------------------------------------------------------------

    async def refresh(self, address: str) -> None:
        """Replace the accounting of ``address`` by what the worker reports."""
        assert self.scheduler is not None
        if self._open(address):
            try:
                report = await getattr(self.scheduler.rpc(address), protocol.WORKER_STATUS)()
            except Exception as e:  # a worker without the plugin, or one going away
                logger.debug("no WarmServe status from %s: %r", address, e)
                return
            if address not in self.scheduler.workers:
                return
            if not report.get("closing"):
                devices, instances, host = parse_report(report)
                self.state.update_worker(address, devices, instances, host, time())
                return
        if address in self.state.workers:
            lost = self.state.remove_worker(address)
            logger.info("worker %s is closing; its instances %s are gone", address, lost)

    def _open(self, address: str) -> bool:
        """Whether ``address`` takes work. A closing worker tells the scheduler before it tears
        its plugins down, so from then on it gets no calls (its handlers only answer that it
        closes)."""
        assert self.scheduler is not None
        ws = self.scheduler.workers.get(address)
        return ws is not None and ws.status in (Status.running, Status.paused)

    # -- planning ------------------------------------------------------------------------------

    async def run_once(self) -> list[str]:
        """One planning pass: refresh workers, feed closed windows, plan, enact."""
        assert self.scheduler is not None
        await self._ready()
        async with self._run_lock:
            await asyncio.gather(*(self.refresh(a) for a in list(self.scheduler.workers)))
            now = time()
            closed = self.meter.close_until(now)
            for w in closed:
                self.policy.observe(w.model, w.index, w.avg, w.peak)
            if closed and self.history is not None:
                await self.history.closed(len({w.index for w in closed}))
            actions = self.policy.plan(self.state.snapshot(now, self.short.load(now)))
            if actions:
                logger.debug("planner: %d actions", len(actions))
            self.enact(actions)
            return [repr(a) for a in actions]

    def enact(self, actions: Iterable[Action]) -> list[Starting]:
        """Accept ``actions`` into the accounting and send them; return the starts begun."""
        begun = []
        for action in actions:
            action_logger.debug("enact %r", action)
            match action:
                case Prewarm(model, devices, tier):
                    for worker, devs in self._by_worker(devices).items():
                        self._send(
                            worker,
                            protocol.WORKER_PREWARM,
                            model=model,
                            tier=int(tier),
                            devices=devs,
                        )
                case Evict(model, devices):
                    for worker, devs in self._by_worker(devices).items():
                        self._send(worker, protocol.WORKER_EVICT, model=model, devices=devs)
                case Start(model, devices):
                    starting = self._begin_start(model, tuple(devices))
                    if starting is not None:
                        begun.append(starting)
                case Stop(instance):
                    self._stop(instance)
                case LendKV(device, nbytes):
                    self.state.lend(device, nbytes)
                case ReclaimKV(device, nbytes):
                    self.state.lend(device, -nbytes)
        return begun

    def _by_worker(self, devices: Iterable[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d in devices:
            worker = self.state.worker_of(d)
            if worker is None:
                logger.debug("device %s has no worker; action dropped", d)
                continue
            out.setdefault(worker, []).append(d)
        return out

    def _send(self, worker: str, op: str, **kwargs: Any) -> None:
        """Fire and forget, in order per worker; a failure is logged and the worker re-read."""

        async def call() -> None:
            assert self.scheduler is not None
            async with self._lanes[worker]:
                if not self._open(worker):
                    logger.debug("%s dropped: worker %s is closing", op, worker)
                    return
                try:
                    await getattr(self.scheduler.rpc(worker), op)(**kwargs)
                except Exception as e:
                    logger.info("%s on %s failed: %s", op, worker, e)
                    await self.refresh(worker)

        self._spawn(call())

    def _begin_start(self, model: str, devices: tuple[str, ...]) -> Starting | None:
        worker = self.state.worker_of(devices[0]) if devices else None
        if worker is None:
            logger.info("cannot start %s on %s: no worker holds it", model, devices)
            return None
        starting = Starting(model, devices, worker)
        self.state.starting.append(starting)
        logger.debug("starting %s on %s", model, ",".join(devices))
        self._spawn(self._activate(starting))
        return starting

    async def _activate(self, s: Starting) -> None:
        assert self.scheduler is not None
        t0 = time()
        instance: Instance | None = None
        error: str | None = None
        try:
            while self.state.draining_on(s.devices):  # its deactivation is then first in line
                await asyncio.sleep(DRAIN_POLL_S)
            async with self._lanes[s.worker]:
                if not self._open(s.worker):
                    raise RuntimeError(f"worker {s.worker} is closing")
                iid = await getattr(self.scheduler.rpc(s.worker), protocol.WORKER_ACTIVATE)(
                    model=s.model, device=s.devices[0]
                )
            if s.worker in self.state.workers:
                instance = Instance(
                    iid, s.model, s.devices, s.worker, started=time(), promised=s.reserved
                )
                self.state.instances[iid] = instance
                logger.debug("%s serves %s (%.2fs)", iid, s.model, time() - t0)
        except Exception as raised:
            # Memory taken or the worker going away may pass: the model's requests keep waiting.
            # Any other failure counts toward giving up on the model (ClusterState.start_failing).
            e = arrived(raised)
            expected = isinstance(e, (DoesNotFit, DeviceBusy, WorkerClosing))
            if not expected:
                error = type(e).__name__
            level = logging.INFO if expected else logging.WARNING
            kind = type(e).__name__
            logger.log(level, "activating %s on %s failed: %s: %s", s.model, s.devices, kind, e)
            await self.refresh(s.worker)
        finally:
            self.state.end_start(s, instance, error)
            self._changed(s.model)

    def _stop(self, iid: str) -> None:
        inst = self.state.instances.get(iid)
        if inst is None:
            return
        inst.draining = True
        self.state.revoke(iid)
        if inst.load == 0:
            self._deactivate(inst)

    def _deactivate(self, inst: Instance) -> None:
        self.state.instances.pop(inst.id, None)
        logger.debug("stopping %s (%s)", inst.id, inst.model)
        self._send(inst.worker, protocol.WORKER_DEACTIVATE, instance=inst.id)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- handlers for the front door -----------------------------------------------------------

    async def route(
        self,
        model: str,
        request_id: str,
        exclude: Iterable[str] = (),
        holder: str | None = None,
        lease: int = 0,
    ) -> dict[str, Any]:
        """Where ``request_id`` of ``model`` should run.

        ``{"status": "ok", "worker", "instance", "lease"}``; ``{"status": "queued"}`` when no
        instance has room and the policy starts none (the caller waits and asks again; the request
        counts as load meanwhile); ``{"status": "unknown"}`` for a model not in the registry;
        ``{"status": "failed", "reason"}`` when the model's starts keep failing
        (:meth:`ClusterState.start_failing`; the request is then forgotten). A
        retry after a failed instance passes the same ``request_id`` and the failed instance in
        ``exclude``. ``holder`` is the asking front door's client id: if that client goes away,
        its requests end (:meth:`remove_client`). With ``lease`` > 0, up to that many slots of the
        chosen instance (the request's own included) are leased to ``holder``, and ``"lease"``
        says how many; the request then holds one of them.
        """
        if model not in self.registry:
            return {"status": "unknown"}
        exclude = tuple(exclude)
        for iid in exclude:  # the caller saw it fail: learn what its worker has now
            inst = self.state.instances.get(iid)
            if inst is not None:
                self._spawn(self.refresh(inst.worker))
        if self.state.arrive(request_id, model, holder):
            self._arrive(model, time())
        for _ in range(2):  # a second pass if the start we waited for failed
            inst = self.state.pick(model, exclude)
            granted = 0
            if inst is None:  # only here: a model that never serves has no instance
                never = self._never_serves(model)
                if never is not None:
                    self._finish(request_id, time())
                    return {"status": "failed", "reason": never}
                inst = await self._wait_for_start(model)
            elif holder is not None and lease > 0:
                granted = self.state.grant(holder, inst, lease)
            if request_id not in self.state.requests:
                return {"status": "gone"}  # done() came while we waited
            if inst is not None and inst.id in self.state.instances:
                self.state.assign(request_id, inst, holder if granted else None)
                return {
                    "status": "ok",
                    "worker": inst.worker,
                    "instance": inst.id,
                    "lease": granted,
                }
            failing = self.state.start_failing(model)
            if failing is not None:
                self._finish(request_id, time())
                return {"status": "failed", "reason": failing}
        return {"status": "queued"}

    def _never_serves(self, model: str) -> str | None:
        """Why no TP group of the workers' devices can ever hold ``model`` (weights, KV cache
        and engine), or None; None too while no worker has joined (one may bring room)."""
        devices = tuple(
            (d.node, d.memory) for w in self.state.workers.values() for d in w.devices.values()
        )
        if not devices:
            return None
        if devices != self._fit_devices:
            self._fit_devices = devices
            self._never = never_serve(self.registry, devices, self.policy.config)
            for reason in self._never.values():
                logger.error("%s: its requests are answered 503", reason)
        return self._never.get(model)

    def sync(
        self,
        holder: str,
        events: Iterable[list] = (),
        returned: Iterable[str] = (),
        held: Iterable[str] = (),
    ) -> dict[str, Any]:
        """A front door's batch about its leases, applied in order; returns the leases it holds
        that this scheduler ended (``{"revoked": [instance ids]}``).

        ``events`` are ``["arrive", request_id, model, instance, age]`` (a request took a leased
        slot) and ``["done", request_id, age]`` (a request finished, whatever its slot), ``age``
        being seconds before the batch was sent, so their times do not depend on the two
        clocks agreeing. ``returned`` names the leases the front door ends (its requests there
        keep their slots until done).
        """
        now = time()
        for event in events:
            t = now - float(event[-1])
            if event[0] == "arrive":
                _, request_id, model, iid, _ = event
                if self.state.arrive(request_id, model, holder):
                    self._arrive(model, t)
                inst = self.state.instances.get(iid)
                if inst is not None:
                    self.state.assign(request_id, inst, holder)
            else:
                self._finish(event[1], t)
        for iid in returned:
            self.state.end_lease(holder, iid)
        mine = self.state.leases.get(holder, {})
        return {"revoked": [iid for iid in held if iid not in mine]}

    def _at(self, t: float) -> float:
        """``t`` moved into [latest time fed, now]: the meters need times in order, and a batch's
        events may predate one routed meanwhile (by at most one batch interval)."""
        self._clock = min(max(t, self._clock), max(time(), self._clock))
        return self._clock

    def _arrive(self, model: str, t: float) -> None:
        t = self._at(t)
        self.meter.arrive(model, t)
        self.short.arrive(model, t)

    async def _wait_for_start(self, model: str) -> Instance | None:
        """Reserve a slot on a start under way (asking the policy for one if none) and await it."""
        await self._ready()
        starting = self.state.starting_with_room(model)
        if starting is None:
            now = time()
            actions = self.policy.on_demand(self.state.snapshot(now, self.short.load()), model)
            if actions:
                logger.debug("on demand for %s: %s", model, actions)
            self.enact(actions)
            starting = self.state.starting_with_room(model)
        if starting is None:
            return None
        starting.reserved += 1
        try:
            return await asyncio.shield(starting.ready)
        finally:
            starting.reserved -= 1
            started = starting.ready.result() if starting.ready.done() else None
            if started is not None:
                started.promised = max(0, started.promised - 1)

    def done(self, request_id: str) -> None:
        """A request finished, failed or was rejected: free its slot and count it gone."""
        self._finish(request_id, time())

    def _finish(self, request_id: str, t: float) -> None:
        req, inst = self.state.finish(request_id)
        if req is None:
            return
        t = self._at(t)
        self.meter.depart(req.model, t)
        self.short.depart(req.model, t)
        if inst is not None and inst.load == 0:
            if inst.draining:
                self._deactivate(inst)
            self._changed(inst.model)

    def _changed(self, model: str) -> None:
        """Tell the front doors that memory may be free or an instance ready (an instance went
        idle or stopped, a start ended), so that their waiting requests ask again now rather
        than at their next poll. The sim's ``_depart`` and ``READY`` events do the same."""
        assert self.scheduler is not None
        self.scheduler.log_event(protocol.SCHEDULER_CHANGED, model)

    def status(self) -> dict[str, Any]:
        """Devices, instances, waiting requests and load, for operators and the dashboard."""
        out = self.state.summary()
        out["policy"] = self.policy.name
        out["models"] = {
            name: {"family": spec.family, "bytes": spec.nbytes, "tp": spec.tp}
            for name, spec in self.registry.items()
        }
        out["load"] = self.short.load()
        out["in_flight"] = {m: self.meter.level(m) for m in self.meter.models()}
        return out


def parse_report(
    report: Mapping[str, Any],
) -> tuple[list[DeviceSnapshot], list[tuple[str, str, tuple[str, ...]]], list[str]]:
    """Devices, instances ``(id, model, devices)`` and host-cached models from a worker's
    ``warmserve_status`` answer."""
    devices = [
        DeviceSnapshot(
            id=d["id"],
            node=d["node"],
            memory=int(d["memory"]),
            resident=tuple(d.get("resident", ())),
            engines=tuple(d.get("engines", ())),
            lent=int(d.get("lent", 0)),
        )
        for d in report.get("devices", ())
    ]
    instances = [
        (i["id"], i["model"], tuple(i.get("devices") or (i["device"],)))
        for i in report.get("instances", ())
    ]
    return devices, instances, list(report.get("host_cache", ()))
