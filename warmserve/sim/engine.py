"""The event loop: requests arrive, queue, get admitted by instances, and finish.

A plain binary heap of events (departures, instances becoming ready, planner ticks) merged with
the workload's arrival column, which is already sorted and is read in chunks rather than put on
the heap; ``README.md`` says why this and not simpy. Each instance batches continuously: it admits
a request whenever it has fewer than its capacity of requests (``PolicyConfig.capacity``: at most
``instance_capacity``, fewer where its devices hold less KV) and KV room for the request's
tokens; a request then takes the model's prefill time to its first token and decode time per
further token, slowed by the number of busy instances sharing its devices (GPU sharing splits
the compute).

TTFT counts from arrival, so it includes queueing and the activation of the instance the request
waited for. Requests the front door would refuse (queue full) or give up on (timeout), and those
still queued when nothing is left to happen, are rows with status ``dropped``.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from warmserve.policy.config import PolicyConfig
from warmserve.policy.load import LoadMeter, ShortLoad
from warmserve.policy.state import ClusterSnapshot, Policy, Tier
from warmserve.report.schema import DEVICE_SCHEMA, RESULT_SCHEMA
from warmserve.sim.cluster import ClusterSpec, check_workload
from warmserve.sim.state import Instance, SimCluster

_DEPART, _READY, _TICK, _RETRY = 0, 1, 2, 3
_OK, _QUEUE_FULL, _TIMED_OUT, _NEVER = 0, 1, 2, 3
_ERRORS = ("", "queue full", "timed out waiting for an instance", "no instance before the end")
_CHUNK = 65536  # arrivals converted to Python objects at a time (bounds memory at scale)


def _count(inst: Instance) -> int:
    return inst.count


@dataclass
class SimResult:
    """What a run produced: one row per request, the device timeline, and counters."""

    requests: pa.Table
    devices: pa.Table
    stats: dict = field(default_factory=dict)


class Simulator:
    """Replays one workload against one cluster under one policy."""

    def __init__(
        self,
        cluster: ClusterSpec,
        policy: Policy,
        workload: pa.Table,
        config: PolicyConfig,
        progress: bool = False,
        check_actions: bool = True,
    ) -> None:
        cluster.check()
        check_workload(workload, cluster.models)
        self.spec = cluster
        self.costs = cluster.costs
        self.policy = policy
        self.config = config
        self.progress = progress
        self.names = list(cluster.models)
        self.model_index = {m: i for i, m in enumerate(self.names)}
        self.cluster = SimCluster(cluster, self.model_index, config, check_actions)
        col = workload.column("model")
        codes = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        dict_col = codes.dictionary_encode()
        lut = np.array([self.model_index[n] for n in dict_col.dictionary.to_pylist()], np.int32)
        self.midx = lut[dict_col.indices.to_numpy(zero_copy_only=False)] if len(lut) else (
            np.zeros(0, np.int32))  # fmt: skip
        self.arrival = workload.column("arrival").to_numpy(zero_copy_only=False).astype(np.float64)
        self.inp = workload.column("input_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
        self.out = workload.column("output_tokens").to_numpy(zero_copy_only=False).astype(np.int64)
        n = len(self.arrival)
        self.start = np.full(n, np.nan)
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.error = np.zeros(n, np.int8)
        self.tier = np.full(n, -1, np.int8)
        self.queues: list[deque[int]] = [deque() for _ in self.names]
        self.meter = LoadMeter(config.window)
        nm = len(self.names)
        self.short = ShortLoad(config.average)  # the autoscaler's load, as measured live
        self.next_demand = [-math.inf] * nm
        self.demand_version = [-1] * nm  # cluster version of a call that changed nothing
        self.retry_at = [math.inf] * nm  # when a queued model next asks again (one event each)
        self.heap: list[tuple] = []
        self.seq = 0
        self.events = 0
        self.policy_calls = 0
        self.policy_s = 0.0  # wall time inside the policy (stats only, never in results)

    # -- load bookkeeping ------------------------------------------------------------------

    def _arrive_load(self, m: int, t: float) -> None:
        self.meter.arrive(self.names[m], t)
        self.short.arrive(self.names[m], t)

    def _depart_load(self, m: int, t: float) -> None:
        self.meter.depart(self.names[m], t)
        self.short.depart(self.names[m], t)

    def _queued(self) -> dict[str, int]:
        return {self.names[m]: len(q) for m, q in enumerate(self.queues) if q}

    # -- policy ----------------------------------------------------------------------------

    def _push(self, t: float, kind: int, obj: object, r: int = -1) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj, r))

    def _enact(self, snap: ClusterSnapshot, actions: list, t: float) -> None:
        for inst in self.cluster.apply(snap, actions, t):
            self._push(inst.ready_at, _READY, inst)
        regrown, self.cluster.regrown = self.cluster.regrown, []
        for inst in regrown:  # KV taken back: queued requests may fit now, not at the next event
            if inst.ready and not inst.draining and self.queues[inst.midx]:
                self._pull(inst, t)
        self.cluster.record(t)

    def _tick(self, t: float) -> None:
        for w in self.meter.close_until(t):
            self.policy.observe(w.model, w.index, w.avg, w.peak)
        self._purge(t)
        snap = self.cluster.snapshot(t, self.short.load(t), self._queued())
        self.policy_calls += 1
        t0 = time.perf_counter()
        actions = self.policy.plan(snap)
        self.policy_s += time.perf_counter() - t0
        self._enact(snap, actions, t)

    def _on_demand(self, m: int, t: float) -> None:
        """Ask the policy for an instance now. A call that changed nothing is not repeated for
        this model until the cluster changes (an answer cannot differ before then)."""
        if self.demand_version[m] == self.cluster.version:
            return
        self.next_demand[m] = t + self.costs.demand_interval_s
        snap = self.cluster.snapshot(t, self.short.load(t), self._queued())
        self.policy_calls += 1
        t0 = time.perf_counter()
        actions = self.policy.on_demand(snap, self.names[m])
        self.policy_s += time.perf_counter() - t0
        self._enact(snap, actions, t)
        self.demand_version[m] = self.cluster.version

    # -- requests --------------------------------------------------------------------------

    def _admit(self, r: int, inst: Instance, t: float) -> None:
        need = int(self.inp[r] + self.out[r])
        inst.count += 1
        self.cluster.moved.add(inst)
        inst.kv_used += need
        slow = 1
        if inst.shared:
            slow = max(sum(1 for i in d.instances if i.count) for d in inst.devices)
        first = t + inst.prefill_s * slow
        fin = first + max(int(self.out[r]) - 1, 0) * inst.decode_s * slow
        self.start[r] = t
        self.first[r] = first
        self.finish[r] = fin
        self.tier[r] = int(inst.tier)
        if fin > inst.last_finish:
            inst.last_finish = fin
        self.seq += 1
        heapq.heappush(self.heap, (fin, self.seq, _DEPART, inst, r))

    def _room(self, inst: Instance, r: int) -> bool:
        if inst.count >= inst.capacity:
            return False
        return inst.count == 0 or inst.kv_used + self.inp[r] + self.out[r] <= inst.kv_budget

    def _drop(self, r: int, m: int, t: float, why: int) -> None:
        self.error[r] = why
        self.finish[r] = t
        self._depart_load(m, t)

    def _arrive(self, r: int, m: int, t: float) -> None:
        best = None
        serving = self.cluster.serving[m]
        if serving:
            least = min(serving, key=_count)
            if self._room(least, r):
                best = least
            else:  # the least loaded lacks KV room for this request; another may have it
                for inst in serving:
                    if self._room(inst, r) and (best is None or inst.count < best.count):
                        best = inst
        self._arrive_load(m, t)
        if best is not None:
            self._admit(r, best, t)
            return
        q = self.queues[m]
        if len(q) >= self.costs.max_queue:
            self._drop(r, m, t, _QUEUE_FULL)
            return
        q.append(r)
        self._ask(m, t)

    def _ask(self, m: int, t: float, now: bool = False) -> None:
        """The head of ``m``'s queue asks for an instance, as the live front door's does: now,
        and again every ``demand_interval_s`` while requests wait beyond the instances already
        starting for them, or at once when told that something changed (``now``)."""
        q = self.queues[m]
        if len(q) <= self.cluster.starting_slots[m]:
            return
        if now or t >= self.next_demand[m]:
            self._on_demand(m, t)
        if q and self.retry_at[m] == math.inf:
            self.retry_at[m] = max(t + self.costs.demand_interval_s, self.next_demand[m])
            self._push(self.retry_at[m], _RETRY, m)

    def _pull(self, inst: Instance, t: float) -> None:
        """Admit queued requests of the instance's model while it has room."""
        q = self.queues[inst.midx]
        timeout = self.costs.request_timeout_s
        while q:
            r = q[0]
            if self.arrival[r] + timeout < t:
                q.popleft()
                self._drop(r, inst.midx, t, _TIMED_OUT)
                continue
            if not self._room(inst, r):
                return
            q.popleft()
            self._admit(r, inst, t)

    def _purge(self, t: float) -> None:
        """Drop queued requests that waited longer than the request timeout."""
        timeout = self.costs.request_timeout_s
        for m, q in enumerate(self.queues):
            while q and self.arrival[q[0]] + timeout < t:
                self._drop(q.popleft(), m, t, _TIMED_OUT)

    def _depart(self, inst: Instance, r: int, t: float) -> None:
        inst.count -= 1
        self.cluster.moved.add(inst)
        inst.kv_used -= int(self.inp[r] + self.out[r])
        self._depart_load(inst.midx, t)
        if not inst.draining and self.queues[inst.midx]:
            self._pull(inst, t)
        if inst.count == 0:
            self.cluster.version += 1  # an idle instance: a waiting model's answer may differ
            self._changed(t)

    def _changed(self, t: float) -> None:
        """An instance went idle or became ready: every waiting model asks again now, as the
        live scheduler's ``warmserve-changed`` event makes each front door's queue heads do."""
        for m, q in enumerate(self.queues):
            if q:
                self._ask(m, t, now=True)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> SimResult:
        n = len(self.arrival)
        tick = self.config.tick
        end_hint = float(self.arrival[-1]) if n else 0.0
        bar = tqdm(
            total=round(end_hint),
            unit="sim s",
            disable=not self.progress,
            mininterval=2.0,
            desc=f"simulate {getattr(self.policy, 'name', '')}",
        )
        self.cluster.record(0.0)
        self._push(0.0, _TICK, None)
        heap = self.heap
        i = 0
        chunk_t: list[float] = []
        chunk_m: list[int] = []
        ci = 0
        t = 0.0
        while True:
            if ci == len(chunk_t) and i < n:
                chunk_t = self.arrival[i : i + _CHUNK].tolist()
                chunk_m = self.midx[i : i + _CHUNK].tolist()
                ci = 0
            t_arr = chunk_t[ci] if ci < len(chunk_t) else math.inf
            if heap and heap[0][0] <= t_arr:
                t, _, kind, obj, r = heapq.heappop(heap)
                self.events += 1
                if kind == _DEPART:
                    self._depart(obj, r, t)
                elif kind == _READY:
                    self.cluster.mark_ready(obj)
                    self.cluster.version += 1
                    if obj.id in self.cluster.instances:
                        self._pull(obj, t)
                    self._changed(t)
                elif kind == _RETRY:
                    self.retry_at[obj] = math.inf
                    self._ask(obj, t)
                else:
                    self._tick(t)
                    bar.update(max(0, min(round(t), bar.total) - bar.n))
                    if i < n or len(heap) > 0 or any(self.queues):
                        self._push(t + tick, _TICK, None)
                continue
            if t_arr == math.inf:
                break
            t = t_arr
            self._arrive(i, chunk_m[ci], t)
            self.events += 1
            ci += 1
            i += 1
        bar.close()
        for m, q in enumerate(self.queues):
            while q:
                self._drop(q.popleft(), m, t, _NEVER)
        self.cluster.record(t)
        return SimResult(self._requests(), self._devices(), self._stats(t))

    # -- output ----------------------------------------------------------------------------

    def _requests(self) -> pa.Table:
        ok = self.error == _OK
        ttft = np.where(ok, self.first - self.arrival, np.nan)
        decoded = self.out - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(ok & (decoded > 0), (self.finish - self.first) / decoded, np.nan)
        tier_names = np.array([t.name.lower() for t in Tier] + [""], dtype=object)
        n = len(self.arrival)
        nan = np.full(n, np.nan)
        cols = {
            "model": pa.array(self.names, pa.string()).take(pa.array(self.midx)),
            "arrival": self.arrival,
            "sent": self.arrival,
            "start": self.start,
            "first_token": np.where(ok, self.first, np.nan),
            "finish": self.finish,
            "ttft": ttft,
            "tpot": tpot,
            "latency": np.where(ok, self.finish - self.arrival, nan),
            "input_tokens": self.inp.astype(np.int32),
            "output_tokens": self.out.astype(np.int32),
            "http_status": np.where(ok, 200, np.where(self.error == _QUEUE_FULL, 429, 504)).astype(
                np.int32
            ),
            "status": np.where(ok, "ok", "dropped").astype(object),
            "error": np.array(_ERRORS, dtype=object)[self.error],
            "tier": tier_names[self.tier],
        }
        return pa.table(cols, schema=RESULT_SCHEMA)

    def _devices(self) -> pa.Table:
        rows = self.cluster.timeline
        devs = self.cluster.devices
        idx = np.array([r[1] for r in rows], dtype=np.int64)
        ids = np.array([d.id for d in devs], dtype=object)
        nodes = np.array([d.node for d in devs], dtype=object)
        mem = np.array([d.memory for d in devs], dtype=np.int64)
        cols = {
            "time": np.array([r[0] for r in rows], dtype=np.float64),
            "device": ids[idx] if len(rows) else [],
            "node": nodes[idx] if len(rows) else [],
            "mode": [r[2] for r in rows],
            "memory": mem[idx] if len(rows) else [],
            "weights_bytes": np.array([r[3] for r in rows], dtype=np.int64),
            "kv_bytes": np.array([r[4] for r in rows], dtype=np.int64),
            "lent_bytes": np.array([r[5] for r in rows], dtype=np.int64),
            "serving": [r[6] for r in rows],
            "resident": [r[7] for r in rows],
        }
        return pa.table(cols, schema=DEVICE_SCHEMA)

    def _stats(self, end: float) -> dict:
        return {
            "requests": len(self.arrival),
            "ok": int((self.error == _OK).sum()),
            "dropped": int((self.error != _OK).sum()),
            "events": self.events,
            "policy_calls": self.policy_calls,
            "policy_s": round(self.policy_s, 3),
            "end_time": end,
            "accepted_actions": dict(self.cluster.accepted),
            "rejected_actions": dict(self.cluster.rejected),
        }
