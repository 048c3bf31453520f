"""The one ledger of device memory, updated as actions are accepted, and ``apply``.

Like ``workers_memory`` in ``distributed.active_memory_manager``, :class:`Accounting` is built
from a snapshot and every action a policy decides on goes through it before it is emitted, so two
actions never spend the same bytes. The enactors (simulator, scheduler plugin) can run the same
ledger with :func:`apply` to check and follow a list of actions.

Semantics of the actions (what :meth:`Accounting.enact` checks and does, in list order):

- Memory per device = resident weight shards (``ceil(nbytes / tp)`` each) + for each instance on
  it its weight shard and KV shard (see :mod:`warmserve.policy.config`) + ``engine_bytes`` for
  each model family with an engine up there - ``lent`` KV bytes. It never exceeds the device's
  memory.
- A *replica* is a model on a TP group: devices of one node, ``tp`` of them. Two replicas that
  share a device have nested or disjoint device sets, and a model has at most one replica on any
  device.
- ``Prewarm(model, devices, DEVICE|ENGINE)`` makes a new resident replica (and passes the weights
  through the node's host memory, so the node's host cache gains the model); ``ENGINE`` also
  brings up an engine of the model's family there (charged ``engine_bytes`` per device unless
  one is up already). An engine stays up while a replica of its family is on the device.
  ``Prewarm(..., HOST)`` only stages the weights in the host memory of the devices' node.
- ``Evict(model, devices)`` drops the resident replica on exactly ``devices``, crediting its
  shard back on every device of the group. The host cache keeps the model.
- ``Start(model, devices)`` turns the resident replica on exactly ``devices`` into an instance, or
  loads the weights there if the model is on none of them; either way it reserves KV. It never
  evicts anything: policies emit the Evicts first. The instance id is ``model@dev+dev...``.
- ``Stop(instance)`` frees the KV; the weights stay resident (the device goes universal). A policy
  that wants them gone emits an Evict after the Stop. Lent KV of a device that is no longer
  dedicated returns to zero.
- ``LendKV(device, n)`` lets prewarmed weights use ``n`` bytes of a dedicated device's KV
  reservation; ``ReclaimKV(device, n)`` takes them back and needs the memory to be free (Evicts
  first).

Infeasible actions raise :class:`InfeasibleAction`; nothing is changed then.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from warmserve.policy.config import PolicyConfig
from warmserve.policy.index import BELOW, INDEX_TYPES, DeviceIndex, GroupStats
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
    Start,
    Stop,
    Tier,
)
from warmserve.registry import ModelSpec


class InfeasibleAction(ValueError):
    """An action breaks the memory, placement or state rules of the ledger."""


@dataclass(slots=True, eq=False)
class Replica:
    """A model's weights on one TP group; an instance when ``instance`` is set."""

    model: str
    devices: tuple[str, ...]
    instance: str | None = None
    score: float = 0.0  # planner's value of keeping it (higher displaces lower)
    load: float = 0.0
    started: float = 0.0


def aligned_groups(devices: list[str], tp: int) -> list[tuple[str, ...]]:
    """Candidate TP groups on one node: the first ``tp`` devices of each aligned power-of-two
    block. Groups of different sizes drawn this way are nested or disjoint when ``tp`` is a power
    of two, which keeps the nesting rule cheap to satisfy."""
    if tp > len(devices):
        return []
    block = 1 << (tp - 1).bit_length()
    if block > len(devices):
        return [tuple(devices[:tp])]
    return [tuple(devices[s : s + tp]) for s in range(0, len(devices) - block + 1, block)]


_LEDGERS = itertools.count()  # tells ledgers apart for caches keyed by ledger (never in output)


class Accounting:
    """Mutable view of a snapshot: memory use, replicas, host caches, per device and node."""

    def __init__(self, snapshot: ClusterSnapshot, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.ledger_id = next(_LEDGERS)
        self.touched: set[str] = set()  # nodes changed since the snapshot (see :meth:`sync`)
        self.version: dict[str, int] = {}  # model -> count of changes to its replica list
        self.bumped: set[str] = set()  # models whose version moved (a scorer clears it)
        self.time = snapshot.time
        self.models: Mapping[str, ModelSpec] = snapshot.models
        self._shards: dict[str, int] = {}  # model -> bytes of its shard, as asked for
        self._kv_shards: dict[tuple[str, int], int] = {}  # (model, memory) -> KV shard bytes
        self._largest: int | None = None  # the largest device's memory, once asked for
        self.load = dict(snapshot.load)
        self.queued = dict(snapshot.queued)
        self.order = [d.id for d in snapshot.devices]
        self.position = {d: i for i, d in enumerate(self.order)}
        self.node = {d.id: d.node for d in snapshot.devices}
        self.memory = {d.id: d.memory for d in snapshot.devices}
        self.engines = {d.id: list(d.engines) for d in snapshot.devices}
        self.lent = {d.id: d.lent for d in snapshot.devices}
        engine = self.config.engine_bytes
        self.used = {d.id: engine * len(d.engines) for d in snapshot.devices}
        self.kv = dict.fromkeys(self.order, 0)
        self.on: dict[str, list[Replica]] = {d: [] for d in self.order}
        self.nodes: dict[str, list[str]] = {}
        for d in snapshot.devices:
            self.nodes.setdefault(d.node, []).append(d.id)
        number = {n: i for i, n in enumerate(self.nodes)}
        self.node_of = np.array([number[self.node[d]] for d in self.order], np.intp)  # in nodes
        self.host = {n: set(snapshot.host_cache.get(n, ())) for n in self.nodes}
        for n, cached in snapshot.host_cache.items():
            self.host.setdefault(n, set(cached))
        self.instances: dict[str, Replica] = {}
        self.replicas: dict[str, list[Replica]] = {}  # model -> its replicas
        self._groups: dict[int, list[tuple[str, ...]]] = {}
        self._group_index: dict[int, np.ndarray] = {}
        # The device index, built on first use and then kept up to date: its rows as Python
        # numbers, and the arrays, written from the rows changed since when next asked for.
        self._rows: list[tuple] | None = None
        self._index: DeviceIndex | None = None
        self._unwritten: set[int] = set()
        self._group_of: dict[int, tuple[list[int], list[list[int]]]] = {}  # see group_of
        self._stats: dict[int, GroupStats] = {}  # tp -> stats, while the index lives
        self._stale: dict[int, set[int]] = {}  # tp -> device positions changed since
        self._empty_from: dict[int, int] = {}  # tp -> no group before it is empty
        for inst in snapshot.instances:
            r = Replica(inst.model, inst.devices, inst.id, load=inst.load, started=inst.started)
            self._add(r)
        for model, devs in self._resident_groups(snapshot):
            self._add(Replica(model, devs))
        self.touched.clear()
        self._source = snapshot

    # ----------------------------------------------------------------------------- queries

    def shard(self, model: str) -> int:
        out = self._shards.get(model)
        if out is None:
            spec = self.models[model]
            out = self._shards[model] = math.ceil(spec.nbytes / spec.tp)
        return out

    def group_memory(self, devices: Iterable[str]) -> int:
        """The smallest device of a group: what bounds an instance's KV there."""
        return min(map(self.memory.__getitem__, devices))

    def capacity(self, model: str, devices: Iterable[str]) -> int:
        """Concurrent requests an instance of ``model`` serves on ``devices``
        (:meth:`PolicyConfig.capacity`)."""
        return self.config.capacity(self.models[model], self.group_memory(devices))

    def best_capacity(self, model: str) -> int:
        """The capacity of an instance of ``model`` on the largest devices: what the planner
        counts a wanted replica as (on a cluster of one device size, every instance's)."""
        if self._largest is None:
            self._largest = max(self.memory.values(), default=0)
        return self.config.capacity(self.models[model], self._largest)

    def kv_shard(self, model: str, devices: Iterable[str]) -> int:
        """KV bytes an instance of ``model`` on ``devices`` reserves on each of them."""
        return self.kv_shard_at(model, self.group_memory(devices))

    def kv_shard_at(self, model: str, memory: int) -> int:
        """:meth:`kv_shard` on a group whose smallest device has ``memory`` bytes."""
        key = (model, memory)
        out = self._kv_shards.get(key)
        if out is None:
            spec = self.models[model]
            out = self._kv_shards[key] = math.ceil(
                self.config.kv_reservation(spec, memory) / spec.tp
            )
        return out

    def free(self, device: str) -> int:
        return self.memory[device] - self.used[device] + self.lent[device]

    def engine_need(self, model: str, device: str) -> int:
        """Bytes an engine for ``model`` would add on ``device``: none if its family has one."""
        if self.models[model].family in self.engines[device]:
            return 0
        return self.config.engine_bytes

    def dedicated(self, device: str) -> bool:
        return any(r.instance for r in self.on[device])

    def mode(self, device: str) -> DeviceMode:
        if self.dedicated(device):
            return DeviceMode.DEDICATED
        return DeviceMode.UNIVERSAL if self.on[device] else DeviceMode.IDLE

    def groups(self, tp: int) -> list[tuple[str, ...]]:
        """Every candidate TP group of size ``tp``, node by node in snapshot order."""
        out = self._groups.get(tp)
        if out is None:
            out = self._groups[tp] = [
                g for devs in self.nodes.values() for g in aligned_groups(devs, tp)
            ]
        return out

    def group_index(self, tp: int) -> np.ndarray:
        """:meth:`groups` of size ``tp`` as a (groups x tp) array of device positions."""
        out = self._group_index.get(tp)
        if out is None:
            groups, at = self.groups(tp), self.position
            flat = np.fromiter((at[d] for g in groups for d in g), np.intp, len(groups) * tp)
            out = self._group_index[tp] = flat.reshape(len(groups), tp)
        return out

    def group_of(self, tp: int) -> tuple[list[int], list[list[int]]]:
        """Each device's group in :meth:`groups` of size ``tp`` (-1 for none: the groups of
        one size are disjoint), and each group's device positions, as Python lists."""
        out = self._group_of.get(tp)
        if out is None:
            gi = self.group_index(tp)
            of = np.full(len(self.order), -1, np.intp)
            of[gi] = np.arange(len(gi))[:, None]
            out = self._group_of[tp] = (of.tolist(), gi.tolist())
        return out

    def device_index(self) -> DeviceIndex:
        """The per-device arrays placement ranks groups with (see :class:`DeviceIndex`)."""
        rows = self._index_rows()
        ix = self._index
        if ix is None:
            columns = list(zip(*rows, strict=True)) if rows else [()] * len(DeviceIndex._fields)
            ix = self._index = DeviceIndex(
                *(np.array(c, t) for c, t in zip(columns, INDEX_TYPES, strict=True))
            )
        else:
            for i in self._unwritten:
                for column, value in zip(ix, rows[i], strict=True):
                    column[i] = value
        self._unwritten.clear()
        return ix

    def _index_rows(self) -> list[tuple]:
        if self._rows is None:
            self._rows = [()] * len(self.order)
            for d in self.order:
                self._refresh(d)
        return self._rows

    def group_stats(self, tp: int) -> GroupStats:
        """The groups of size ``tp`` folded from the device index (see :class:`GroupStats`):
        built once per index, then only the rows of groups whose devices changed."""
        st = self._stats.get(tp)
        if st is None:
            ix, gi = self.device_index(), self.group_index(tp)
            free = ix.free[gi]
            st = self._stats[tp] = GroupStats(
                free=free.min(axis=1),
                count=ix.count[gi].max(axis=1),
                inst=ix.inst[gi].max(axis=1),
                room=(free + ix.rbytes[gi]).min(axis=1),
                rmin=ix.rmin[gi].min(axis=1),
                rmax=ix.rmax[gi].max(axis=1),
                rsum=ix.rsum[gi].max(axis=1)
                if tp == 1
                else np.maximum(ix.rsum[gi].max(axis=1), ix.rshare[gi].sum(axis=1)) * BELOW,
            )
            self._stale[tp] = set()
            return st
        stale = self._stale[tp]
        if stale:
            (of, members), groups = self.group_of(tp), self.groups(tp)
            for j in {of[p] for p in stale}:
                if j >= 0:
                    self._fold(st, j, groups[j], members[j])
            stale.clear()
        return st

    def _fold(self, st: GroupStats, j: int, group: tuple[str, ...], positions: list[int]) -> None:
        """Set row ``j`` of ``st`` from the rows of its devices ``group`` (at ``positions``),
        counting the distinct instances and residents' scores of several as placement does."""
        rows = self._rows
        assert rows is not None
        if len(positions) == 1:
            free, count, inst, rbytes, rsum, rmin, rmax, _ = rows[positions[0]]
            room = free + rbytes
        else:
            cols = zip(*[rows[p] for p in positions], strict=True)
            free, count, _, rbytes, _, rmin, rmax, _ = cols
            room = min(map(operator.add, free, rbytes))
            free, count, rmin, rmax = min(free), max(count), min(rmin), max(rmax)
            over = self.overlapping(group)
            inst = sum(1 for r in over if r.instance)
            rsum = sum(r.score for r in over if not r.instance)  # as placement sums them
        st.free[j], st.count[j], st.inst[j], st.room[j] = free, count, inst, room
        st.rmin[j], st.rmax[j], st.rsum[j] = rmin, rmax, rsum

    def set_score(self, r: Replica, score: float) -> None:
        """Give ``r`` a new score, keeping the device index in step."""
        if r.score != score:
            r.score = score
            for d in r.devices:
                self._refresh(d)

    def _refresh(self, device: str) -> None:
        """Recompute one device's row of the index (a handful of replicas at most); the arrays
        and group stats take it up when next asked for."""
        rows = self._rows
        if rows is None:
            return
        i = self.position[device]
        on = self.on[device]
        scores: list[float] = []
        rbytes, rshare = 0, 0.0
        for r in on:
            if not r.instance:
                scores.append(r.score)
                rbytes += self.shard(r.model)
                rshare += r.score / len(r.devices)
        if scores and self.config.engine_bytes and self.engines[device]:
            # The engines that would go with the residents: of families no instance serves.
            family = {r.model: self.models[r.model].family for r in on}
            gone = {family[r.model] for r in on if not r.instance}
            gone.difference_update(family[r.model] for r in on if r.instance)
            rbytes += self.config.engine_bytes * len(gone.intersection(self.engines[device]))
        rows[i] = (
            self.memory[device] - self.used[device] + self.lent[device],
            len(on),
            len(on) - len(scores),
            rbytes,
            sum(scores),  # summed as placement sums a group's, so one device's is exact
            min(scores, default=math.inf),
            max(scores, default=-math.inf),
            rshare,
        )
        self._unwritten.add(i)
        for stale in self._stale.values():
            stale.add(i)
        if not on:  # its groups may be empty now
            for tp, j in self._empty_from.items():
                g = self._group_of[tp][0][i]
                if 0 <= g < j:
                    self._empty_from[tp] = g

    def empty_group(self, tp: int, need: int) -> tuple[str, ...] | None:
        """The first group whose devices hold nothing and have ``need`` bytes free: no
        placement beats it.

        Groups fill in order as a plan places replicas on an empty cluster, so the search
        starts past the leading groups known to hold something, and most calls look at one
        group (or none, once every group holds something)."""
        rows = self._index_rows()
        members = self.group_of(tp)[1]
        j = self._empty_from.get(tp, 0)
        while j < len(members) and any(rows[p][1] for p in members[j]):
            j += 1
        self._empty_from[tp] = j
        if j == len(members):
            return None
        if all(rows[p][0] >= need for p in members[j]):
            return self.groups(tp)[j]
        st = self.group_stats(tp)  # the first empty group is short: look at the others
        ok = (st.count == 0) & (st.free >= need)
        first = int(ok.argmax())
        return self.groups(tp)[first] if ok[first] else None

    def replica_on(self, model: str, device: str) -> Replica | None:
        for r in self.on[device]:
            if r.model == model:
                return r
        return None

    def resident_replica(self, model: str, devices: tuple[str, ...]) -> Replica | None:
        """The resident (not serving) replica of ``model`` on exactly ``devices``."""
        for r in self.replicas.get(model, ()):
            if r.instance is None and set(r.devices) == set(devices):
                return r
        return None

    def tier(self, model: str, devices: tuple[str, ...]) -> Tier:
        """Warmth of ``model`` on a whole group: the coldest of its devices."""
        r = self.replica_on(model, devices[0])
        if r is not None and set(r.devices) == set(devices):
            if r.instance:
                return Tier.ACTIVE
            family = self.models[model].family
            if all(family in self.engines[d] for d in devices):
                return Tier.ENGINE
            return Tier.DEVICE
        return Tier.HOST if model in self.host[self.node[devices[0]]] else Tier.DISK

    def conflicts(self, devices: tuple[str, ...], ignore: Replica | None = None) -> list[Replica]:
        """Replicas on ``devices`` whose device sets are neither nested in nor around them."""
        group = set(devices)
        out: list[Replica] = []
        for d in devices:
            for r in self.on[d]:
                if r is ignore or r in out:
                    continue
                other = set(r.devices)
                if not (other <= group or group <= other):
                    out.append(r)
        return out

    def overlapping(self, devices: tuple[str, ...]) -> list[Replica]:
        """Distinct replicas with a shard on any of ``devices``, in device order."""
        out: list[Replica] = []
        for d in devices:
            for r in self.on[d]:
                if r not in out:
                    out.append(r)
        return out

    # ------------------------------------------------------------------------------ checks

    def _check_group(self, model: str, devices: tuple[str, ...]) -> None:
        if model not in self.models:
            raise InfeasibleAction(f"unknown model {model!r}")
        tp = self.models[model].tp
        if len(devices) != tp or len(set(devices)) != tp:
            raise InfeasibleAction(f"{model!r} needs {tp} distinct devices, got {devices}")
        for d in devices:
            if d not in self.node:
                raise InfeasibleAction(f"unknown device {d!r}")
        if len({self.node[d] for d in devices}) != 1:
            raise InfeasibleAction(f"TP group {devices} of {model!r} spans nodes")

    # ----------------------------------------------------------------------------- updates

    def _add(self, r: Replica) -> None:
        shard = self.shard(r.model)
        kv = self.kv_shard(r.model, r.devices) if r.instance else 0
        self.version[r.model] = self.version.get(r.model, 0) + 1
        self.bumped.add(r.model)
        self.touched.add(self.node[r.devices[0]])
        for d in r.devices:
            self.on[d].append(r)
            self.used[d] += shard + kv
            self.kv[d] += kv
            self._refresh(d)
        self.replicas.setdefault(r.model, []).append(r)
        if r.instance:
            self.instances[r.instance] = r

    def _remove(self, r: Replica) -> None:
        shard = self.shard(r.model)
        kv = self.kv_shard(r.model, r.devices) if r.instance else 0
        self.version[r.model] = self.version.get(r.model, 0) + 1
        self.bumped.add(r.model)
        self.touched.add(self.node[r.devices[0]])
        for d in r.devices:
            self.on[d].remove(r)
            self.used[d] -= shard + kv
            self.kv[d] -= kv
            self.lent[d] = min(self.lent[d], self.kv[d])
            self._drop_engine(d, self.models[r.model].family)
            self._refresh(d)
        self.replicas[r.model].remove(r)
        if r.instance:
            del self.instances[r.instance]

    def _drop_engine(self, device: str, family: str) -> None:
        if family in self.engines[device] and not any(
            self.models[r.model].family == family for r in self.on[device]
        ):
            self.engines[device].remove(family)
            self.used[device] -= self.config.engine_bytes

    def _up_engine(self, device: str, family: str) -> None:
        """Charge an engine of ``family`` on ``device`` unless one is up; the caller then adds a
        replica there, which refreshes the device's row of the index."""
        if family not in self.engines[device]:
            self.engines[device].append(family)
            self.used[device] += self.config.engine_bytes

    def enact(self, action: Action) -> None:
        """Check ``action`` against the ledger and record it; raise if it does not fit."""
        match action:
            case Prewarm(model, devices, tier):
                self.prewarm(model, tuple(devices), tier)
            case Evict(model, devices):
                self.evict(model, tuple(devices))
            case Start(model, devices):
                self.start(model, tuple(devices))
            case Stop(instance):
                self.stop(instance)
            case LendKV(device, nbytes):
                self.lend(device, nbytes)
            case ReclaimKV(device, nbytes):
                self.reclaim(device, nbytes)
            case _:
                raise InfeasibleAction(f"not an action: {action!r}")

    def prewarm(self, model: str, devices: tuple[str, ...], tier: Tier, score: float = 0.0) -> None:
        self._check_group(model, devices)
        node = self.node[devices[0]]
        if tier <= Tier.HOST:
            self.host[node].add(model)
            self.touched.add(node)
            return
        if tier == Tier.ACTIVE:
            raise InfeasibleAction("Prewarm cannot make an instance; use Start")
        for d in devices:
            if self.replica_on(model, d) is not None:
                raise InfeasibleAction(f"{model!r} is already on {d}")
        if self.conflicts(devices):
            raise InfeasibleAction(f"{devices} overlaps a replica without nesting")
        shard = self.shard(model)
        engine = tier == Tier.ENGINE
        short = [
            d
            for d in devices
            if self.free(d) < shard + (self.engine_need(model, d) if engine else 0)
        ]
        if short:
            raise InfeasibleAction(f"prewarm {model!r}: no room on {short}")
        if engine:
            for d in devices:
                self._up_engine(d, self.models[model].family)
        self._add(Replica(model, devices, score=score))
        self.host[node].add(model)

    def evict(self, model: str, devices: tuple[str, ...]) -> None:
        r = self.resident_replica(model, devices)
        if r is None:
            raise InfeasibleAction(f"{model!r} has no resident replica on exactly {devices}")
        self._remove(r)

    def start(self, model: str, devices: tuple[str, ...]) -> str:
        self._check_group(model, devices)
        if self.capacity(model, devices) < 1:
            raise InfeasibleAction(f"{devices} cannot hold one request of {model!r}")
        r = self.resident_replica(model, devices)
        if r is None and any(self.replica_on(model, d) for d in devices):
            raise InfeasibleAction(f"{model!r} already has a replica on part of {devices}")
        if self.conflicts(devices, ignore=r):
            raise InfeasibleAction(f"{devices} overlaps a replica without nesting")
        need = self.kv_shard(model, devices) + (0 if r else self.shard(model))
        short = [d for d in devices if self.free(d) < need + self.engine_need(model, d)]
        if short:
            raise InfeasibleAction(f"start {model!r}: no room on {short}")
        if r is not None:
            self._remove(r)
        for d in devices:
            self._up_engine(d, self.models[model].family)
        instance = f"{model}@{'+'.join(devices)}"
        self._add(Replica(model, devices, instance, started=self.time))
        self.host[self.node[devices[0]]].add(model)
        return instance

    def stop(self, instance: str) -> None:
        r = self.instances.get(instance)
        if r is None:
            raise InfeasibleAction(f"no instance {instance!r}")
        self._remove(r)
        for d in r.devices:
            self._up_engine(d, self.models[r.model].family)  # the engine stays up, idle
        self._add(Replica(r.model, r.devices, score=r.score))
        for d in r.devices:
            if not self.dedicated(d):
                self.lent[d] = 0
                self._refresh(d)

    def lend(self, device: str, nbytes: int) -> None:
        if nbytes <= 0 or not self.dedicated(device):
            raise InfeasibleAction(f"cannot lend {nbytes} on non-dedicated {device}")
        if self.lent[device] + nbytes > self.kv[device]:
            raise InfeasibleAction(f"{device} reserves only {self.kv[device]} bytes of KV")
        self.lent[device] += nbytes
        self.touched.add(self.node[device])
        self._refresh(device)

    def reclaim(self, device: str, nbytes: int) -> None:
        if nbytes <= 0 or nbytes > self.lent[device]:
            raise InfeasibleAction(f"{device} lent {self.lent[device]}, cannot reclaim {nbytes}")
        if self.free(device) < nbytes:
            raise InfeasibleAction(f"reclaim on {device}: evict the weights in lent space first")
        self.lent[device] -= nbytes
        self.touched.add(self.node[device])
        self._refresh(device)

    # --------------------------------------------------------------------------- snapshots

    def _resident_groups(self, snapshot: ClusterSnapshot) -> Iterable[tuple[str, tuple]]:
        """Resident replicas of a snapshot: the aligned groups each model fully occupies, then
        whatever is left chunked in device order (a snapshot lists residency per device only)."""
        resident = _idle_resident(snapshot.devices, snapshot.instances)
        for devs in self.nodes.values():
            yield from self._node_groups(devs, resident)

    def _node_groups(self, devs: list[str], resident: Mapping) -> Iterable[tuple[str, tuple]]:
        holding: dict[str, list[str]] = {}
        for d in devs:
            for model in resident[d]:
                holding.setdefault(model, []).append(d)
        for model, held in holding.items():
            tp = self.models[model].tp
            free = set(held)
            for g in aligned_groups(devs, tp):
                if free.issuperset(g):
                    yield model, g
                    free.difference_update(g)
            left = [d for d in held if d in free]
            for i in range(0, len(left) - tp + 1, tp):
                yield model, tuple(left[i : i + tp])

    # ----------------------------------------------------------------------- incremental

    def sync(self, snapshot: ClusterSnapshot) -> bool:
        """Make this ledger what ``Accounting(snapshot)`` would be, rebuilding only the nodes
        whose devices or instances differ from the snapshot it was last made from, or that the
        actions recorded since changed. False (and the ledger is to be dropped) when the
        devices themselves differ: then only a new ledger will do.

        Lists keep the order a fresh ledger has per device; a model's replica list may be in
        another order, which no policy decision depends on. Replica objects of unchanged nodes
        are kept, with their scores (the planner sets every score anew each call).
        """
        last = self._source
        if snapshot.models is not self.models or len(snapshot.devices) != len(self.order):
            return False
        dirty = set(self.touched)
        if snapshot.devices is not last.devices:
            for o, n in zip(last.devices, snapshot.devices, strict=True):
                if o is not n:
                    if o.id != n.id or o.node != n.node:
                        return False
                    if o != n:
                        dirty.add(n.node)
        reload: list = []
        pairs = None
        if len(last.instances) == len(snapshot.instances):  # often the same, some loads moved
            pairs = []
            for o, i in zip(last.instances, snapshot.instances, strict=True):
                if o is not i:
                    if o.id != i.id or o.model != i.model or o.devices != i.devices:
                        pairs = None
                        break
                    pairs.append(i)
        if pairs is not None:
            for i in pairs:
                reload.append((self.node[i.devices[0]], i))
        else:
            old = {i.id: i for i in last.instances}
            new = {i.id: i for i in snapshot.instances}
            for iid, i in new.items():
                o = old.get(iid)
                if o is i:
                    continue
                node = self.node.get(i.devices[0]) if i.devices else None
                if node is None:
                    return False
                if o is None or o.model != i.model or o.devices != i.devices:
                    dirty.add(node)
                else:
                    reload.append((node, i))
            for iid, o in old.items():
                if iid not in new:
                    dirty.add(self.node[o.devices[0]])
        if snapshot.host_cache is not last.host_cache:
            if set(snapshot.host_cache) - set(self.nodes):
                return False
            before = last.host_cache
            for n in self.nodes:
                cached = snapshot.host_cache.get(n, ())
                if cached is not before.get(n, ()) and self.host[n] != cached:
                    self.host[n] = set(cached)
        if dirty:
            by_node: dict[str, list] = {n: [] for n in dirty}
            for i in snapshot.instances:
                node = self.node[i.devices[0]]
                if node in by_node:
                    by_node[node].append(i)
            for node in sorted(dirty, key=lambda n: self.position[self.nodes[n][0]]):
                if not self._rebuild_node(node, snapshot, by_node[node]):
                    return False
        for node, i in reload:
            if node not in dirty:
                r = self.instances[i.id]
                r.load, r.started = i.load, i.started
        self.time = snapshot.time
        self.load = dict(snapshot.load)
        self.queued = dict(snapshot.queued)
        self.touched.clear()
        self._source = snapshot
        return True

    def _rebuild_node(self, node: str, snapshot: ClusterSnapshot, instances: list) -> bool:
        """Charge ``node``'s devices anew from ``snapshot``. A replica that is still there
        (same model, devices and instance) keeps its object, and its model's replica list and
        version stay as they are."""
        devs = self.nodes[node]
        here = set(devs)
        old: dict[tuple, Replica] = {}
        for d in devs:
            for r in self.on[d]:
                if not here.issuperset(r.devices):
                    return False
                old[(r.model, r.devices, r.instance)] = r
        engine = self.config.engine_bytes
        for d in devs:
            ds = snapshot.devices[self.position[d]]
            self.memory[d] = ds.memory
            self._largest = None
            self.engines[d] = list(ds.engines)
            self.lent[d] = ds.lent
            self.used[d] = engine * len(ds.engines)
            self.kv[d] = 0
            self.on[d] = []
        resident = _idle_resident([snapshot.devices[self.position[d]] for d in devs], instances)
        self.host[node] = set(snapshot.host_cache.get(node, ()))
        for inst in instances:
            if not here.issuperset(inst.devices):
                return False
            r = old.pop((inst.model, tuple(inst.devices), inst.id), None)
            if r is None:
                r = Replica(inst.model, inst.devices, inst.id, load=inst.load, started=inst.started)
                self._add(r)
            else:
                r.load, r.started = inst.load, inst.started
                self._charge(r)
        for model, g in self._node_groups(devs, resident):
            r = old.pop((model, g, None), None)
            if r is None:
                self._add(Replica(model, g))
            else:
                self._charge(r)
        for r in old.values():  # gone from the node
            self.replicas[r.model].remove(r)
            self.version[r.model] = self.version.get(r.model, 0) + 1
            self.bumped.add(r.model)
            if r.instance:
                del self.instances[r.instance]
        for d in devs:
            self._refresh(d)
        return True

    def _charge(self, r: Replica) -> None:
        """Put a replica the ledger already lists back on its devices (see :meth:`sync`)."""
        shard = self.shard(r.model)
        kv = self.kv_shard(r.model, r.devices) if r.instance else 0
        for d in r.devices:
            self.on[d].append(r)
            self.used[d] += shard + kv
            self.kv[d] += kv

    def snapshot(self) -> ClusterSnapshot:
        """The cluster after the accepted actions."""
        devices = tuple(
            DeviceSnapshot(
                id=d,
                node=self.node[d],
                memory=self.memory[d],
                resident=tuple(r.model for r in self.on[d] if r.instance is None),
                engines=tuple(self.engines[d]),
                lent=self.lent[d],
            )
            for d in self.order
        )
        instances = tuple(
            InstanceSnapshot(r.instance, r.model, r.devices, r.load, r.started)
            for r in self.instances.values()
            if r.instance
        )
        return ClusterSnapshot(
            time=self.time,
            models=self.models,
            devices=devices,
            instances=instances,
            host_cache={n: frozenset(sorted(c)) for n, c in self.host.items() if c},
            load=dict(self.load),
            queued=dict(self.queued),
        )


def _idle_resident(
    devices: Iterable[DeviceSnapshot], instances: Iterable[InstanceSnapshot]
) -> dict[str, tuple[str, ...]]:
    """Each device's resident models, less those an instance of the same model serves there.

    A worker may keep the pool copy of a model it serves (so a stop leaves it warm) and report
    it as resident; the instance already is that model's replica on the device, and counting
    the copy too would put two replicas of one model on one device (which a stop then turns
    into two idle ones)."""
    serving = {(i.model, d) for i in instances for d in i.devices}
    return {d.id: tuple(m for m in d.resident if (m, d.id) not in serving) for d in devices}


class LedgerCache:
    """One ledger kept in step with the snapshots a policy is called with.

    Building a ledger for a thousand devices costs tens of milliseconds in Python, and the
    simulator calls a policy hundreds of thousands of times a day, each time with a snapshot
    that differs from the last on a few nodes. :meth:`ledger` rebuilds only those (see
    :meth:`Accounting.sync`). The ledger it returns is the cache's own: use it for one call
    and drop it; the next call re-syncs whatever that call recorded.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._acc: Accounting | None = None

    def ledger(self, snapshot: ClusterSnapshot) -> Accounting:
        acc = self._acc
        if acc is None or not acc.sync(snapshot):
            acc = self._acc = Accounting(snapshot, self.config)
            acc.device_index()
        return acc


def apply(
    snapshot: ClusterSnapshot, actions: Iterable[Action], config: PolicyConfig | None = None
) -> ClusterSnapshot:
    """Enact ``actions`` in order on a copy of ``snapshot``; raise :class:`InfeasibleAction` at
    the first one that breaks a rule. The simulator uses this as its cluster model."""
    acc = Accounting(snapshot, config)
    for a in actions:
        acc.enact(a)
    return acc.snapshot()
