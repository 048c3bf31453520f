"""The simulated cluster's state: devices, host caches, instances, and how actions change them.

This is the simulator's side of the policy contract (``warmserve.policy.state``): it turns a
policy's actions into memory and time, checks each against its own accounting (so two actions
never spend the same bytes, as the active memory manager does), and builds the snapshots the
policy sees. Requests and the event loop live in :mod:`warmserve.sim.engine`.

Semantics the policy can rely on:

- Prewarmed weights count as resident from the moment the Prewarm is accepted (their memory is
  reserved then); an instance started on them waits until the copy lands.
- Memory is charged as ``warmserve.policy.config`` describes: an instance holds its weight shard
  and ``kv_reservation / tp`` of KV cache on each device of its group, for the requests it admits
  at most (``PolicyConfig.capacity``: what fits beside the weights on its devices); prewarmed
  weights use the rest of the device plus whatever KV space the device lends (LendKV). Instances
  started on one device (GPU sharing) each keep their own reservation and split the compute.
- Start evicts the other models' prewarmed weights from its devices (down to host memory) and
  takes back lent KV space.
- A start where no weights of the model are resident but an idle engine of its family is up
  (no instance of the family on the device) copies the weights in and switches that engine
  to them, as the worker's activation does: no engine start.
- Stop drains: the instance admits nothing new and frees its devices when its last request ends.
  Its weights then drop to the node's host memory and its engine exits, unless the cost model's
  ``serving.keep_weights_on_stop`` is set, in which case they stay as prewarmed weights.
- An action that does not fit (no memory, wrong TP width, devices across nodes, unknown names) is
  rejected whole and counted in :attr:`SimCluster.rejected`; it never half-applies.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping

from warmserve.policy.accounting import Accounting, InfeasibleAction
from warmserve.policy.config import PolicyConfig
from warmserve.policy.state import (
    Action,
    ClusterSnapshot,
    DeviceMode,
    DeviceSnapshot,
    Evict,
    InstanceSnapshot,
    LendKV,
    Prewarm,
    ReclaimKV,
    Stop,
    Tier,
)
from warmserve.registry import ModelSpec
from warmserve.sim.cluster import ClusterSpec

logger = logging.getLogger("warmserve.sim.actions")


class Instance:
    """A simulated serving instance: its slots, KV budget (tokens) and serving costs."""

    __slots__ = (
        "capacity",
        "count",
        "decode_s",
        "devices",
        "draining",
        "id",
        "kv_budget",
        "kv_dev",
        "kv_per_token",
        "kv_used",
        "last_finish",
        "midx",
        "model",
        "prefill_s",
        "ready",
        "ready_at",
        "shared",
        "snap",
        "tier",
    )

    def __init__(self, iid: str, spec: ModelSpec, midx: int) -> None:
        self.id = iid
        self.model = spec.name
        self.midx = midx
        self.devices: list[Device] = []
        self.capacity = 0  # requests it admits at most (PolicyConfig.capacity on its devices)
        self.count = 0  # requests admitted and not finished
        self.kv_used = 0  # tokens of KV held by admitted requests
        self.last_finish = 0.0  # when the last admitted request ends (drain time after Stop)
        self.kv_budget = 0  # tokens of KV this instance may hold
        self.kv_dev = 0  # bytes of KV reserved on each of its devices
        self.kv_per_token = 0.0
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.ready = False
        self.ready_at = 0.0
        self.draining = False
        self.shared = False  # some device of it also hosts another instance
        self.tier = Tier.DISK
        self.snap: InstanceSnapshot | None = None  # cached while its load is unchanged


class Device:
    """One simulated device: prewarmed weights, engines up, instances, lent KV space."""

    __slots__ = (
        "draining",
        "engines",
        "id",
        "idx",
        "instances",
        "lent",
        "loaded",
        "memory",
        "node",
        "resident",
        "snap",
    )

    def __init__(self, idx: int, did: str, node: str, memory: int) -> None:
        self.idx = idx
        self.id = did
        self.node = node
        self.memory = memory
        self.resident: dict[str, float] = {}  # model -> time its weights are in place
        self.engines: dict[str, float] = {}  # family -> time its engine is up
        # family -> the model its engine last served: starting that model again needs no switch
        self.loaded: dict[str, str] = {}
        self.instances: list[Instance] = []
        self.lent = 0
        self.draining: dict[str, float] = {}  # model of a stopped instance -> its drain end
        self.snap: DeviceSnapshot | None = None  # cached snapshot; None after a change


class SimCluster:
    """Devices, host caches and instances of one simulation, changed only by :meth:`apply`."""

    def __init__(
        self,
        spec: ClusterSpec,
        model_index: Mapping[str, int],
        config: PolicyConfig,
        check_actions: bool = True,
    ) -> None:
        self.spec = spec
        self.config = config
        self.check_actions = check_actions
        self.costs = spec.costs
        self.models = spec.models
        self.model_index = model_index
        self.devices = [
            Device(i, did, node, spec.device_memory)
            for i, (did, node) in enumerate(spec.device_ids())
        ]
        self.by_id = {d.id: d for d in self.devices}
        self.per_device = {m.name: -(-m.nbytes // m.tp) for m in self.models.values()}
        self.profiles = {m.name: self.costs.profile(m) for m in self.models.values()}
        # node -> model -> time its weights are in host memory; LRU order, oldest first
        self.host: dict[str, OrderedDict[str, float]] = {
            node: OrderedDict() for node in {d.node for d in self.devices}
        }
        self.host_used: dict[str, int] = dict.fromkeys(self.host, 0)
        self.instances: dict[str, Instance] = {}
        self.serving: list[list[Instance]] = [[] for _ in model_index]  # ready, not draining
        # Slots of the instances not ready yet, per model (their capacities added up).
        self.starting_slots: list[int] = [0] * len(model_index)
        self.rejected: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.timeline: list[tuple] = []
        self.version = 0  # counts accepted actions and readiness: what a policy's answer sees
        self.regrown: list[Instance] = []  # instances whose KV budget a ReclaimKV raised
        self._host_snap: dict[str, frozenset[str]] | None = None
        self._dev_snap: tuple[DeviceSnapshot, ...] | None = None  # None after any change
        self._snaps: list = [None] * len(self.devices)  # device snapshots, in device order
        self._stale: set[int] = set(range(len(self.devices)))  # devices to snapshot anew
        self._host_fs: dict[str, frozenset[str]] = {}  # node -> its cache as a snapshot holds it
        self._host_stale: set[str] = set(self.host)
        self._inst_snaps: list[InstanceSnapshot] = []  # in the order of self.instances
        self._inst_pos: dict[str, int] | None = None  # None after an instance came or went
        self.moved: set[Instance] = set()  # instances whose request count changed (the engine)
        self._touched: set[int] = set()
        for d in self.devices:
            self._touched.add(d.idx)

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(
        self, t: float, load: Mapping[str, float], queued: Mapping[str, int]
    ) -> ClusterSnapshot:
        devices = self._dev_snap
        if devices is None:
            snaps = self._snaps
            for idx in self._stale:
                d = self.devices[idx]
                if d.snap is None:
                    d.snap = DeviceSnapshot(
                        id=d.id,
                        node=d.node,
                        memory=d.memory,
                        resident=tuple(d.resident),
                        engines=tuple(d.engines),
                        lent=d.lent,
                    )
                snaps[idx] = d.snap
            self._stale.clear()
            devices = self._dev_snap = tuple(snaps)
        snaps = self._inst_snaps
        if self._inst_pos is None:  # instances came or went: list them all
            snaps.clear()
            for i in self.instances.values():
                snaps.append(self._inst_snap(i))
            self._inst_pos = {iid: k for k, iid in enumerate(self.instances)}
        else:  # only loads moved
            pos = self._inst_pos
            for i in self.moved:
                k = pos.get(i.id)
                if k is not None and self.instances.get(i.id) is i:
                    snaps[k] = self._inst_snap(i)
        self.moved.clear()
        instances = snaps
        if self._host_snap is None:
            for n in self._host_stale:  # unchanged nodes keep their frozenset (same object)
                self._host_fs[n] = frozenset(self.host[n])
            self._host_stale.clear()
            self._host_snap = dict(self._host_fs)
        return ClusterSnapshot(
            time=t,
            models=self.models,
            devices=devices,
            instances=tuple(instances),
            host_cache=self._host_snap,
            load=load,
            queued=queued,
        )

    @staticmethod
    def _inst_snap(i: Instance) -> InstanceSnapshot:
        if i.snap is None:
            i.snap = InstanceSnapshot(
                id=i.id,
                model=i.model,
                devices=tuple(d.id for d in i.devices),
                load=float(i.count),
                started=i.ready_at,
            )
        elif i.snap.load != i.count:
            s = i.snap
            i.snap = InstanceSnapshot(s.id, s.model, s.devices, float(i.count), s.started)
        return i.snap

    # -- accounting ------------------------------------------------------------------------

    def _resident_bytes(self, d: Device) -> int:
        return sum(self.per_device[m] for m in d.resident)

    def _changed(self, d: Device) -> None:
        d.snap = None
        self._dev_snap = None
        self._stale.add(d.idx)
        self._touched.add(d.idx)

    def _rebudget(self, devices: list[Device]) -> None:
        """Each instance's KV budget in tokens: its reservation less its share of lent space."""
        seen: set[str] = set()
        for d in devices:
            for inst in d.instances:
                if inst.id in seen:
                    continue
                seen.add(inst.id)
                per_token = inst.kv_per_token / len(inst.devices)
                budget = min(
                    (inst.kv_dev - e.lent / len(e.instances)) / per_token for e in inst.devices
                )
                inst.kv_budget = max(int(budget), 0)
                inst.shared = any(len(e.instances) > 1 for e in inst.devices)

    def _to_host(self, node: str, model: str, ready: float) -> None:
        """Put ``model`` in ``node``'s host memory (LRU; the oldest entries make room)."""
        cache = self.host[node]
        if model in cache:
            cache.move_to_end(model)  # the set of models is the same: snapshots stay valid
            return
        self._host_snap = None
        self._host_stale.add(node)
        need = self.models[model].nbytes
        while self.host_used[node] + need > self.spec.host_memory and cache:
            old, _ = cache.popitem(last=False)
            self.host_used[node] -= self.models[old].nbytes
        cache[model] = ready
        self.host_used[node] += need

    def _load_time(self, model: str, d: Device, t: float, group: set[int]) -> float:
        """When ``model``'s weights can be in ``d``'s memory if a copy starts at ``t``: from a
        device of the node outside ``group``, else the node's host memory, else its disk."""
        nbytes = self.per_device[model]
        for e in self.devices_of(d.node):
            ready = e.resident.get(model)
            if ready is not None and e.idx not in group:
                return max(t, ready) + self.costs.peer_load_s(nbytes)
        host = self.host[d.node].get(model)
        if host is not None:
            self._to_host(d.node, model, host)  # a use refreshes its LRU position
            return max(t, host) + self.costs.host_load_s(nbytes)
        disk_done = t + self.costs.disk_load_s(self.models[model].nbytes)
        self._to_host(d.node, model, disk_done)
        return disk_done + self.costs.host_load_s(nbytes)

    def devices_of(self, node: str) -> list[Device]:
        per = self.spec.devices_per_node
        n = int(node[1:])
        return self.devices[n * per : (n + 1) * per]

    def tier(self, model: str, devices: list[Device]) -> Tier:
        """The contract's tier of ``model`` on a group: the coldest of its devices."""
        family = self.models[model].family

        def one(d: Device) -> Tier:
            if model in d.resident:
                return Tier.ENGINE if family in d.engines else Tier.DEVICE
            return Tier.HOST if model in self.host[d.node] else Tier.DISK

        return min(one(d) for d in devices)

    # -- actions ---------------------------------------------------------------------------

    def apply(self, snapshot: ClusterSnapshot, actions: list[Action], t: float) -> list[Instance]:
        """Enact a policy's ``actions`` (planned on ``snapshot``) at ``t``, in order.

        Each action is first checked by the policy package's own ledger
        (:class:`~warmserve.policy.accounting.Accounting`), so the simulator rejects exactly
        what the live enactor would; a rejected action changes nothing and is counted. Returns
        the instances created (the caller schedules their readiness).

        With ``check_actions`` off the ledger is skipped: the shipped policies already run every
        action through it before emitting it, and at a thousand devices building it costs more
        than the rest of the simulation (``bench/sim_scale.py``).
        """
        if not actions:
            return []
        ledger = Accounting(snapshot, self.config) if self.check_actions else None
        started = []
        for a in actions:
            kind = type(a).__name__
            try:
                if ledger is not None:
                    ledger.enact(a)
            except InfeasibleAction as e:
                self.rejected[kind] += 1
                logger.debug("t=%.3f rejected %r: %s", t, a, e)
                continue
            self.accepted[kind] += 1
            self.version += 1
            inst = self._enact(a, t)
            if inst is not None:
                started.append(inst)
        return started

    def _enact(self, a: Action, t: float) -> Instance | None:
        if isinstance(a, Stop):
            if a.instance in self.instances:
                self._stop(self.instances[a.instance], t)
        elif isinstance(a, LendKV | ReclaimKV):
            d = self.by_id[a.device]
            d.lent += a.nbytes if isinstance(a, LendKV) else -a.nbytes
            self._changed(d)
            self._rebudget([d])
            if isinstance(a, ReclaimKV):
                self.regrown += d.instances
        else:
            devices = [self.by_id[x] for x in a.devices]
            if isinstance(a, Prewarm):
                self._prewarm(a.model, devices, a.tier, t)
            elif isinstance(a, Evict):
                for d in devices:
                    self._evict(d, a.model, t)
            else:
                return self._start(a.model, devices, t)
        return None

    def _drop_engine(self, d: Device, family: str) -> None:
        if not any(self.models[m].family == family for m in d.resident) and not any(
            self.models[i.model].family == family for i in d.instances
        ):
            d.engines.pop(family, None)
            d.loaded.pop(family, None)

    def _evict(self, d: Device, model: str, t: float) -> None:
        ready = d.resident.pop(model, None)
        if ready is None:
            return
        self._to_host(d.node, model, max(t, ready))
        self._drop_engine(d, self.models[model].family)
        self._changed(d)

    def _prewarm(self, model: str, devices: list[Device], tier: Tier, t: float) -> None:
        node = devices[0].node
        if tier <= Tier.HOST:
            if model not in self.host[node]:
                self._to_host(node, model, t + self.costs.disk_load_s(self.models[model].nbytes))
            return
        family = self.models[model].family
        group = {d.idx for d in devices}
        for d in devices:
            d.resident[model] = self._load_time(model, d, self._free_at(d, t), group)
            if tier == Tier.ENGINE and family not in d.engines:
                d.engines[family] = d.resident[model] + self.costs.engine_start_s
                d.loaded[family] = model  # a new engine starts on the model it is brought up for
            self._changed(d)

    def _start(self, model: str, devices: list[Device], t: float) -> Instance:
        spec = self.models[model]
        tier = self.tier(model, devices)
        group = {d.idx for d in devices}
        ready = t
        for d in devices:
            t = self._free_at(d, t, model)
        for d in devices:
            w = d.resident.pop(model, None)
            up = d.engines.get(spec.family)
            if w is not None and up is not None:
                same = d.loaded.get(spec.family) == model  # the idle engine still holds it
                at = max(t, w, up) + (0.0 if same else self.costs.activate_s)
            elif w is not None:
                at = max(t, w) + self.costs.engine_start_s
            elif up is not None and all(
                self.models[i.model].family != spec.family for i in d.instances
            ):
                # An idle engine of the family switches in place to weights copied in (as the
                # worker's activation does): no engine start.
                at = max(self._load_time(model, d, t, group), up) + self.costs.activate_s
            else:
                at = self._load_time(model, d, t, group) + self.costs.engine_start_s
            ready = max(ready, at)
        inst = Instance(f"{model}@{'+'.join(d.id for d in devices)}", spec, self.model_index[model])
        prof = self.profiles[model]
        inst.devices = devices
        inst.kv_per_token = prof.kv_bytes_per_token
        memory = min(d.memory for d in devices)
        inst.capacity = self.config.capacity(spec, memory)
        inst.kv_dev = -(-self.config.kv_reservation(spec, memory) // spec.tp)
        inst.prefill_s = prof.prefill_s
        inst.decode_s = prof.decode_s
        inst.ready_at = ready
        inst.tier = tier
        self.instances[inst.id] = inst
        self._inst_pos = None
        self.starting_slots[inst.midx] += inst.capacity
        self._to_host(devices[0].node, model, ready)
        for d in devices:
            d.engines[spec.family] = min(d.engines.get(spec.family, ready), ready)
            d.loaded[spec.family] = model
            d.instances.append(inst)
            self._changed(d)
        self._rebudget(devices)
        return inst

    def _free_at(self, d: Device, t: float, same: str = "") -> float:
        """When work can start on ``d`` at ``t``: after stopped instances there drain, except one
        of ``same`` model, whose engine and weights a new instance of that model simply reuses."""
        for model, end in list(d.draining.items()):
            if end <= t:
                del d.draining[model]
            elif model != same:
                t = end
        return t

    def mark_ready(self, inst: Instance) -> None:
        """The instance's activation finished: it admits requests from now on."""
        if self.instances.get(inst.id) is not inst:
            return  # stopped before it was ready; _stop did the accounting
        self.starting_slots[inst.midx] -= inst.capacity
        inst.ready = True
        if not inst.draining:
            self.serving[inst.midx].append(inst)

    def _stop(self, inst: Instance, t: float) -> None:
        """The ledger's Stop at once: KV freed, weights resident, engine up. The requests in
        flight still finish; the devices are busy until they do, so loads and activations that
        follow on them wait (:meth:`_free_at`)."""
        inst.draining = True
        if inst.ready:
            self.serving[inst.midx].remove(inst)
        else:
            self.starting_slots[inst.midx] -= inst.capacity
        del self.instances[inst.id]
        self._inst_pos = None
        for d in inst.devices:
            d.instances.remove(inst)
            d.resident[inst.model] = max(t, inst.ready_at)
            d.draining[inst.model] = max(d.draining.get(inst.model, 0.0), inst.last_finish)
            if not d.instances:
                d.lent = 0
            self._changed(d)
        self._rebudget(inst.devices)

    # -- timeline --------------------------------------------------------------------------

    def mode(self, d: Device) -> DeviceMode:
        if d.instances:
            return DeviceMode.DEDICATED
        return DeviceMode.UNIVERSAL if d.resident else DeviceMode.IDLE

    def record(self, t: float) -> None:
        """Append a timeline row for each device changed since the last call."""
        for idx in sorted(self._touched):
            d = self.devices[idx]
            weights = sum(self.per_device[i.model] for i in d.instances)
            kv = sum(i.kv_dev for i in d.instances) - d.lent
            self.timeline.append(
                (
                    t,
                    idx,
                    self.mode(d).value,
                    weights + self._resident_bytes(d),
                    kv,
                    d.lent,
                    ",".join(i.model for i in d.instances),
                    ",".join(d.resident),
                )
            )
        self._touched.clear()
