"""The scheduler plugin's one accounting object: devices, instances, starts under way, and which
request holds which slot.

Like ``ActiveMemoryManagerExtension.workers_memory``, it is updated as soon as an action is
accepted (an instance being started counts as dedicating its devices; a routed request counts
against its instance at once) so two decisions never spend the same capacity, and it is corrected
whenever a worker reports its real state. No I/O happens here: the extension does the talking and
calls these methods, which keeps the routing rules testable on their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from warmserve.policy.config import PolicyConfig
from warmserve.policy.state import ClusterSnapshot, DeviceSnapshot, InstanceSnapshot
from warmserve.registry import ModelSpec

logger = logging.getLogger("warmserve.scheduler.state")


@dataclass(slots=True)
class Instance:
    """A serving instance; ``load`` counts the requests routed to it and not done yet.

    ``leased`` counts slots leased to front doors, ``on_lease`` the requests (in ``load``) that
    run on them as last reported, and ``promised`` the slots of requests that waited for this
    instance to start and are not assigned yet. Free leased and promised slots are taken, though
    they are no load the planner should see.
    """

    id: str
    model: str
    devices: tuple[str, ...]
    worker: str
    started: float
    load: int = 0
    leased: int = 0
    on_lease: int = 0
    promised: int = 0
    draining: bool = False  # a Stop was accepted: no new requests, deactivate when idle


@dataclass(eq=False)
class Starting:
    """An instance being activated. Requests may reserve its slots and await ``ready``."""

    model: str
    devices: tuple[str, ...]
    worker: str
    ready: asyncio.Future[Instance | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    reserved: int = 0

    @property
    def id(self) -> str:
        return f"starting:{self.model}@{','.join(self.devices)}"


@dataclass(slots=True)
class WorkerView:
    """What one worker last reported: its devices and the models in its node's host memory."""

    address: str
    devices: dict[str, DeviceSnapshot]
    host_cache: frozenset[str] = frozenset()


@dataclass(slots=True)
class Request:
    """A request the front door asked a route for: waiting (no instance) or holding a slot."""

    model: str
    instance: str | None = None
    holder: str | None = None  # the front door whose lease the slot comes from, if any
    origin: str | None = None  # the front door (Dask client) that asked for it


START_ATTEMPTS = 3
"""Failed starts of a model in a row after which its waiting requests fail (503) instead of
waiting for a start that fails every time (a corrupt checkpoint, an engine that cannot load it)
until the front door's request timeout."""


class ClusterState:
    """Accounting of the whole cluster as the planner and the router see it.

    An instance has :meth:`capacity` slots: ``config.capacity`` on its devices' memory, the
    rule the policy's ledger and the simulator follow (fewer slots on a device too small for
    ``instance_capacity`` requests' KV beside the weights)."""

    def __init__(self, models: Mapping[str, ModelSpec], config: PolicyConfig) -> None:
        self.models = models
        self.config = config
        self._capacity: dict[tuple[str, tuple[str, ...]], int] = {}  # (model, devices) -> slots
        self.workers: dict[str, WorkerView] = {}
        self.instances: dict[str, Instance] = {}
        self.starting: list[Starting] = []
        self.requests: dict[str, Request] = {}
        # KV space lent per device (LendKV/ReclaimKV). Workers size KV when an engine starts and
        # cannot resize it, so this ledger is the only record of lending; it keeps the policy
        # from lending the same space twice.
        self.lent: dict[str, int] = {}
        # Slots leased to each front door (a Dask client id), per instance, in use or not.
        self.leases: dict[str, dict[str, int]] = {}
        # Starts of each model that failed since its last successful one, and the last error's
        # kind: a start that fails every time fails its waiting requests (``START_ATTEMPTS``).
        self.failed_starts: dict[str, tuple[int, str]] = {}

    # -- workers -------------------------------------------------------------------------------

    def worker_of(self, device: str) -> str | None:
        for w in self.workers.values():
            if device in w.devices:
                return w.address
        return None

    def update_worker(
        self,
        address: str,
        devices: Iterable[DeviceSnapshot],
        instances: Iterable[tuple[str, str, tuple[str, ...]]],
        host_cache: Iterable[str],
        now: float,
    ) -> None:
        """Replace what is known of ``address`` by its report; keep the loads of its instances."""
        view = WorkerView(address, {d.id: d for d in devices}, frozenset(host_cache))
        old = self.workers.get(address)
        if old is None or {d.id: d.memory for d in old.devices.values()} != {
            d.id: d.memory for d in view.devices.values()
        }:
            self._capacity.clear()
        self.workers[address] = view
        reported = set()
        for iid, model, devs in instances:
            reported.add(iid)
            if iid not in self.instances:
                self.instances[iid] = Instance(iid, model, devs, address, started=now)
                logger.debug("instance %s of %s found on %s", iid, model, address)
        for iid in [i.id for i in self.instances.values() if i.worker == address]:
            if iid not in reported:
                self._drop_instance(iid)

    def lend(self, device: str, nbytes: int) -> None:
        """Accept a LendKV (``nbytes`` > 0) or a ReclaimKV (``nbytes`` < 0) on ``device``."""
        self.lent[device] = max(0, self.lent.get(device, 0) + nbytes)

    def remove_worker(self, address: str) -> list[str]:
        """Forget ``address``; return the instances lost with it.

        Starts under way there end now, with no instance (their waiters route again): the
        policy must not see devices that are gone, and the activation call may hang until its
        comm times out."""
        view = self.workers.pop(address, None)
        self._capacity.clear()
        for device in view.devices if view else ():
            self.lent.pop(device, None)
        lost = [i.id for i in self.instances.values() if i.worker == address]
        for iid in lost:
            self._drop_instance(iid)
        for s in [s for s in self.starting if s.worker == address]:
            self.end_start(s, None)
        return lost

    def end_start(
        self, starting: Starting, instance: Instance | None, error: str | None = None
    ) -> None:
        """A start is over (``instance`` is None if it failed or its worker left; ``error``
        names the failure's kind if its call failed); wake its waiters. Ending one twice (its
        worker left, then its call failed) does nothing."""
        if starting in self.starting:
            self.starting.remove(starting)
        if instance is not None:
            self.failed_starts.pop(starting.model, None)
        elif error is not None:
            count, _ = self.failed_starts.get(starting.model, (0, ""))
            self.failed_starts[starting.model] = (count + 1, error)
        if not starting.ready.done():
            starting.ready.set_result(instance)

    def start_failing(self, model: str) -> str | None:
        """Why ``model`` cannot be started, once its last ``START_ATTEMPTS`` starts all failed
        (None while it may still start)."""
        count, error = self.failed_starts.get(model, (0, ""))
        if count < START_ATTEMPTS:
            return None
        return f"starting {model} failed {count} times in a row ({error}); see the scheduler log"

    def _drop_instance(self, iid: str) -> None:
        """Forget an instance; its requests become waiting (the front door retries or fails)."""
        self.instances.pop(iid, None)
        self.revoke(iid)
        for r in self.requests.values():
            if r.instance == iid:
                r.instance = None

    # -- routing -------------------------------------------------------------------------------

    def arrive(self, request_id: str, model: str, origin: str | None = None) -> bool:
        """Note a request from front door ``origin``; True if it is new (an arrival), False if
        it is a retry."""
        if request_id in self.requests:
            self.release(request_id)
            return False
        self.requests[request_id] = Request(model, origin=origin)
        return True

    def requests_from(self, origin: str) -> list[str]:
        """The requests front door ``origin`` asked for and has not reported done."""
        return [rid for rid, r in self.requests.items() if r.origin == origin]

    def pick(self, model: str, exclude: Iterable[str] = ()) -> Instance | None:
        """The least-loaded instance of ``model`` with room, not draining, not excluded."""
        skip = set(exclude)
        best = None
        for i in self.instances.values():
            if i.model != model or i.draining or i.id in skip or self.free(i) <= 0:
                continue
            if best is None or self.free(i) > self.free(best):
                best = i
        return best

    def draining_on(self, devices: Iterable[str]) -> bool:
        """Whether an instance that was stopped but is still finishing its requests holds any
        of ``devices``. A start there waits for it, as the simulator's does, rather than race
        it for the device's memory (the planner moves busy instances off a group a wider model
        needs, and starts that model there at once)."""
        want = set(devices)
        return any(i.draining and want & set(i.devices) for i in self.instances.values())

    def capacity(self, model: str, devices: tuple[str, ...]) -> int:
        """Slots of an instance of ``model`` on ``devices``: ``PolicyConfig.capacity`` on the
        smallest of them as their workers report it (``instance_capacity`` while none has, or
        for a model the registry does not name)."""
        key = (model, devices)
        out = self._capacity.get(key)
        if out is None:
            views = self.workers.values()
            memory = [w.devices[d].memory for w in views for d in devices if d in w.devices]
            if not memory or model not in self.models:
                return self.config.instance_capacity
            out = self._capacity[key] = self.config.capacity(self.models[model], min(memory))
        return out

    def free(self, inst: Instance) -> int:
        """Slots of ``inst`` neither in use, leased nor promised."""
        cap = self.capacity(inst.model, inst.devices)
        return cap - (inst.load - inst.on_lease) - inst.leased - inst.promised

    def starting_with_room(self, model: str) -> Starting | None:
        for s in self.starting:
            if s.model == model and s.reserved < self.capacity(model, s.devices):
                return s
        return None

    def assign(self, request_id: str, instance: Instance, holder: str | None = None) -> None:
        """Put the request on ``instance``, on a slot of ``holder``'s lease if it has one there."""
        r = self.requests[request_id]
        r.instance = instance.id
        r.holder = None
        instance.load += 1
        if holder is not None and instance.id in self.leases.get(holder, {}):
            r.holder = holder
            instance.on_lease += 1

    # -- leases to front doors -----------------------------------------------------------------

    def grant(self, holder: str, instance: Instance, slots: int) -> int:
        """Lease up to ``slots`` free slots of ``instance`` to ``holder``; return how many."""
        n = max(0, min(slots, self.free(instance)))
        if n:
            held = self.leases.setdefault(holder, {})
            held[instance.id] = held.get(instance.id, 0) + n
            instance.leased += n
        return n

    def end_lease(self, holder: str, iid: str) -> None:
        """End ``holder``'s lease on ``iid``: its requests there keep their slots, now unleased,
        and its free slots are free for anyone."""
        n = self.leases.get(holder, {}).pop(iid, 0)
        inst = self.instances.get(iid)
        if not n or inst is None:
            return
        inst.leased -= n
        for r in self.requests.values():
            if r.holder == holder and r.instance == iid:
                r.holder = None
                inst.on_lease -= 1

    def revoke(self, iid: str) -> None:
        """End every lease on ``iid`` (stopping or gone); holders learn it when they next sync."""
        for holder in [h for h, held in self.leases.items() if iid in held]:
            self.end_lease(holder, iid)

    def drop_holder(self, holder: str) -> None:
        """A front door went away: its leased slots are free again."""
        for iid in list(self.leases.get(holder, {})):
            self.end_lease(holder, iid)
        self.leases.pop(holder, None)

    def release(self, request_id: str) -> Instance | None:
        """Free the slot ``request_id`` holds, if any; return the instance it was on."""
        r = self.requests.get(request_id)
        if r is None or r.instance is None:
            return None
        inst = self.instances.get(r.instance)
        r.instance = None
        if inst is not None:
            inst.load -= 1
            if r.holder is not None:
                inst.on_lease -= 1  # the slot goes back to the lease it came from
        r.holder = None
        return inst

    def finish(self, request_id: str) -> tuple[Request | None, Instance | None]:
        """A request is done: free its slot and forget it."""
        inst = self.release(request_id)
        return self.requests.pop(request_id, None), inst

    def waiting(self) -> dict[str, int]:
        """Requests per model that hold no slot (queued at a front door or being routed), less
        those with a slot reserved on a start under way: the snapshot already shows them as
        that instance's load, and counted here too the planner saw them twice and started
        another instance for them."""
        out: dict[str, int] = {}
        for r in self.requests.values():
            if r.instance is None:
                out[r.model] = out.get(r.model, 0) + 1
        for s in self.starting:
            if s.model in out:
                out[s.model] -= s.reserved
        return {m: n for m, n in out.items() if n > 0}

    # -- the policy's view ---------------------------------------------------------------------

    def snapshot(self, now: float, load: Mapping[str, float]) -> ClusterSnapshot:
        """What the policy sees; instances being started count as instances already."""
        devices = tuple(
            replace(d, lent=max(d.lent, self.lent.get(d.id, 0)))
            for w in self.workers.values()
            for d in w.devices.values()
        )
        nodes: dict[str, set[str]] = {}
        for w in self.workers.values():
            for d in w.devices.values():
                nodes.setdefault(d.node, set()).update(w.host_cache)
        instances = [
            InstanceSnapshot(i.id, i.model, i.devices, float(i.load), i.started)
            for i in self.instances.values()
            if not i.draining
        ]
        instances += [
            InstanceSnapshot(s.id, s.model, s.devices, float(s.reserved), now)
            for s in self.starting
        ]
        return ClusterSnapshot(
            time=now,
            models=self.models,
            devices=devices,
            instances=tuple(instances),
            host_cache={n: frozenset(m) for n, m in nodes.items()},
            load=dict(load),
            queued=self.waiting(),
        )

    def summary(self) -> dict:
        """A msgpack-friendly picture for ``warmserve_status`` and the dashboard."""
        snap = self.snapshot(0.0, {})
        return {
            "devices": [
                {
                    "id": d.id,
                    "node": d.node,
                    "worker": self.worker_of(d.id),
                    "memory": d.memory,
                    "mode": snap.mode(d.id).value,
                    "resident": list(d.resident),
                    "engines": list(d.engines),
                    "lent": d.lent,
                }
                for d in snap.devices
            ],
            "instances": [
                {
                    "id": i.id,
                    "model": i.model,
                    "devices": list(i.devices),
                    "worker": i.worker,
                    "load": i.load,
                    "leased": i.leased,
                    "on_lease": i.on_lease,
                    "draining": i.draining,
                }
                for i in self.instances.values()
            ],
            "starting": [
                {"model": s.model, "devices": list(s.devices), "reserved": s.reserved}
                for s in self.starting
            ],
            "queued": self.waiting(),
            "leases": {h: dict(held) for h, held in self.leases.items() if held},
        }
