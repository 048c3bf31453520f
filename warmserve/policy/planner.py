"""The WarmServe policy: forecast, score, place, scale and lend, as one ordered list of actions.

``plan()`` runs every tick (``config.tick``, 5 s by default) and does, in this order, each step
recording its actions in one :class:`Accounting` so later steps see what earlier ones spent:

1. reactive autoscaling on the snapshot's short-average load (:mod:`.autoscaler`); then, for
   each model whose waiting requests outnumber the free slots of its instances (those starting
   included) and that the autoscaler started nothing for, a start as ``on_demand`` makes it,
   stopping idle instances where no group is free (:meth:`WarmServePolicy._preempt`), before
   any prewarm can take the memory: prewarming never starves a request (issue 22). The
   autoscaler's own starts never stop anything, and where every group held an instance, idle
   or not, a waiting model got nothing from the tick while the prewarm step filled the KV
   those idle instances lent;
2. KV lending and reclaiming on dedicated devices (:mod:`.kv`);
3. scoring: the forecast peak of the window now open and of the next one gives
   ``ceil(peak / capacity)`` wanted replicas per model (the capacity of an instance on the
   cluster's largest devices, :meth:`Accounting.best_capacity`); replica ``j`` scores
   ``cold_start * activity * rank_decay**j``, times ``min(peak / avg, burst_weight_cap)`` for
   burst replicas (those beyond ``ceil(avg / capacity)``; a model with a zero average forecast
   counts every replica as burst at the cap). ``activity`` (:func:`activity`) is the chance that
   the model has a request in flight, which matters for models whose forecast is a fraction of one
   request in flight: without it such a model's replica scored as much as that of a model kept
   busy all day, and where memory is scarce prewarming evicted weights that were asked for
   minutes later. Existing instances take a model's first ranks, its resident replicas the next
   ones; replicas beyond the wanted count score zero;
4. proactive prewarming of the wanted replicas not yet in place, highest score first, to the
   ENGINE tier (weights in device memory and an engine of the family up beside them, so a start
   is a switch of tens of milliseconds rather than an engine start of tens of seconds), with
   evict-aware placement (:mod:`.placement`, which ranks the groups of a full cluster with numpy
   bounds, so every wanted replica is tried every tick). Once a group size fails for some
   bytes, replicas of lower score and no fewer bytes are skipped (they cannot fit either).

``on_demand()`` first takes back the KV its instances lent (a request found them full); if that
leaves too little room for the queue, it starts one instance on the warmest feasible group,
evicting the lowest-scored residents in the way. When every group is taken by instances
(one instance per device), it stops idle instances (serving no request) where that frees the
best group, and starts there; failing that, it moves busy instances of other models off a group
to free devices elsewhere (a defragmentation); else it returns [] (the request queues).

Between calls the policy keeps only caches of pure functions of its inputs: a ledger kept in
step with the snapshots (:class:`~warmserve.policy.accounting.LedgerCache`), the forecast of the
current window, and each model's scores while its forecast, load and replicas stay the same. The
same snapshots in the same order give the same actions with or without them.

The ablations of the paper are switches of the same class: no prewarming (stopped instances
drop their weights and nothing is prewarmed), no placement (first fit, never displaces), no
proactive prewarming (weights stay only where instances stopped), no KV lending.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from warmserve.policy.accounting import Accounting, LedgerCache
from warmserve.policy.autoscaler import ReactiveAutoscaler
from warmserve.policy.config import PolicyConfig
from warmserve.policy.forecast import CSPParams, Forecaster, MixParams
from warmserve.policy.kv import adjust_lending, reclaim_for
from warmserve.policy.placement import place_prewarm, place_start, start_on
from warmserve.policy.state import Action, ClusterSnapshot, Stop, Tier
from warmserve.registry import ModelSpec


def csp_params(config: PolicyConfig) -> CSPParams:
    """The forecaster the planner runs, scored as ``mixture`` by ``warmserve forecast eval``: an
    online expert mixture of a CSP (corrections across period boundaries, decay 0.8),
    last-value, seasonal-naive, recent medians and quantiles, and exponential smoothing with
    and without the seasonal slope (:class:`MixParams`' defaults); a missed burst is a peak one
    instance's capacity above its forecast."""
    return CSPParams(
        period=config.windows_per_period,
        periods=config.periods,
        correction_windows=config.correction_windows,
        decay=0.8,
        reset=False,
        mix=MixParams(capacity=float(config.instance_capacity)),
    )


def activity(avg: float, peak: float) -> float:
    """The chance that a model with this forecast has a request in flight: ``1 - exp(-avg)``,
    as for a Poisson count of mean ``avg`` (so about 1 from a few requests in flight on).

    A model idle most of the window still shows a peak of one request whenever it is asked for
    at all, so only a peak above one (requests expected together, as in a burst forecast for a
    model with no average load) counts, as ``peak - 1``."""
    return 1.0 - math.exp(-max(avg, peak - 1.0, 0.0))


def replica_scores(
    config: PolicyConfig, spec: ModelSpec, avg: float, peak: float, cap: int | None = None
) -> list[float]:
    """Scores of ``spec``'s wanted replicas, best first (see step 3 of the module docstring),
    each replica serving ``cap`` requests (``instance_capacity`` if not given)."""
    cap = max(cap or config.instance_capacity, 1)
    wanted = math.ceil(max(peak, avg) / cap - 1e-9)
    base = math.ceil(avg / cap - 1e-9)
    burst = min(peak / avg, config.burst_weight_cap) if avg > 0 else config.burst_weight_cap
    cost = config.cold_start(spec) * activity(avg, peak)
    return [
        cost * config.rank_decay**j * (1.0 if j < base else max(burst, 1.0)) for j in range(wanted)
    ]


class WarmServePolicy:
    """The full system, or one of its ablations (see the module docstring)."""

    def __init__(
        self,
        models: Mapping[str, ModelSpec],
        config: PolicyConfig | None = None,
        *,
        name: str = "warmserve",
        prewarm: bool = True,
        placement: bool = True,
        proactive: bool = True,
        lend: bool = True,
    ) -> None:
        self.name = name
        self.models = models
        self.config = config or PolicyConfig()
        self.prewarm = prewarm
        self.placement = placement
        self.proactive = proactive
        self.lend = lend
        self.forecaster = Forecaster(csp_params(self.config), tuple(models))
        self.autoscaler = ReactiveAutoscaler(self.config.grace, drop_weights=not prewarm)
        # Caches of what the same inputs always give (pure functions of them, never state):
        self._ledgers = LedgerCache(self.config)
        self._observed = 0  # windows observed: with the window, what a forecast depends on
        self._forecast: tuple[tuple[int, int], dict[str, tuple[float, float]]] | None = None
        self._scored: dict[str, tuple[tuple, list[tuple[float, str]]]] = {}
        self._scored_ledger = -1
        self._scored_fc: Mapping | None = None
        self._scored_load: set[str] = set()

    def prepare(self) -> None:
        self.forecaster.compile()

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        self.forecaster.observe(model, window, avg, peak)
        self._observed += 1

    def forecast(self, time: float) -> dict[str, tuple[float, float]]:
        """(average, peak) to plan for: the larger of the open window's and the next one's.

        Without proactive prewarming the planner only knows the last closed window."""
        window = math.floor(time / self.config.window)
        key = (window, self._observed)
        if self._forecast is not None and self._forecast[0] == key:
            return self._forecast[1]
        if self.proactive:
            now_avg, now_peak = self.forecaster.predict(window)
            next_avg, next_peak = self.forecaster.predict(window + 1)
            avg = np.maximum(now_avg, next_avg)
            peak = np.maximum(now_peak, next_peak)
        else:
            avg, peak = self.forecaster.last()
        fc = {m: (float(avg[i]), float(peak[i])) for i, m in enumerate(self.forecaster.models)}
        self._forecast = (key, fc)
        return fc

    def _score(self, acc: Accounting, fc: Mapping[str, tuple[float, float]]) -> None:
        """Give existing replicas their scores (and note the wanted ones not yet in place).

        A model whose forecast, load and replica list are what they were at the last call on
        the same ledger keeps the scores that call gave (they would come out the same), and is
        not even looked at unless its replicas changed or it had load then or has now."""
        if self._scored_ledger != acc.ledger_id or self._scored_fc is not fc:
            self._scored, self._scored_ledger, self._scored_fc = {}, acc.ledger_id, fc
            todo: Iterable[str] = self.models
        else:
            todo = acc.bumped | self._scored_load | acc.load.keys()
        acc.bumped.clear()
        self._scored_load = set(acc.load)
        for model in sorted(todo):
            if model not in self.models:
                continue
            avg, peak = fc.get(model, (0.0, 0.0))
            peak = max(peak, acc.load.get(model, 0.0))
            key = (avg, peak, acc.version.get(model, 0))
            done = self._scored.get(model)
            if done is None or done[0] != key:
                cap = acc.best_capacity(model)
                scores = replica_scores(self.config, self.models[model], avg, peak, cap)
                have = sorted(
                    acc.replicas.get(model, ()),
                    key=lambda r: (r.instance is None, acc.position[r.devices[0]]),
                )
                for j, r in enumerate(have):
                    acc.set_score(r, scores[j] if j < len(scores) else 0.0)
                self._scored[model] = (key, [(s, model) for s in scores[len(have) :]])

    def _missing(self) -> list[tuple[float, str]]:
        """The wanted replicas not in place at the last :meth:`_score`, best first."""
        missing = [x for model in sorted(self._scored) for x in self._scored[model][1]]
        missing.sort(key=lambda x: (-x[0], x[1]))
        return missing

    def plan(self, snapshot: ClusterSnapshot) -> list[Action]:
        acc = self._ledgers.ledger(snapshot)
        fc = self.forecast(snapshot.time)
        self._score(acc, fc)
        missing = self._missing()
        out: list[Action] = self.autoscaler.scale(acc)
        for model in self._starved(acc):
            started = place_start(acc, model)
            if not started and any(acc.instances[i].model != model for i in self._spare(acc)):
                started = self._preempt(acc.snapshot(), acc, model, move=False)
            out += started
        if self.lend:
            out += adjust_lending(acc, {m: p for m, (_, p) in fc.items()})
        if self.prewarm and self.proactive:
            failed: dict[int, int] = {}  # tp -> smallest shard no group could take
            for score, model in missing:
                tp, shard = self.models[model].tp, acc.shard(model)
                if shard >= failed.get(tp, shard + 1):
                    continue  # a lower score with as many bytes cannot fit where that did not
                placed = place_prewarm(
                    acc, model, score, evict=self.placement, dedicated=self.lend, tier=Tier.ENGINE
                )
                if not placed:
                    failed[tp] = shard
                out += placed
        return out

    def on_demand(self, snapshot: ClusterSnapshot, model: str) -> list[Action]:
        acc = self._ledgers.ledger(snapshot)
        self._score(acc, self.forecast(snapshot.time))
        out: list[Action] = reclaim_for(acc, model) if self.lend else []
        if out:
            spare = math.fsum(
                acc.capacity(model, r.devices) - r.load for r in acc.replicas[model] if r.instance
            )
            if acc.queued.get(model, 0) <= spare:
                return out  # the loans back are room enough
        started = place_start(acc, model)
        if not started:
            started = self._preempt(snapshot, acc, model)
        return out + started

    def _starved(self, acc: Accounting) -> list[str]:
        """Models with more requests waiting than their instances, those starting included,
        have free slots for."""
        out = []
        for model, waiting in sorted(acc.queued.items()):
            if waiting <= 0 or model not in self.models:
                continue
            free = math.fsum(
                acc.capacity(model, r.devices) - r.load
                for r in acc.replicas.get(model, ())
                if r.instance
            )
            if waiting > free:
                out.append(model)
        return out

    def _spare(self, acc: Accounting) -> list[str]:
        """Instances that can stop at once with nothing lost: those serving no request (one
        with requests in flight would hold its devices until they finish) that have begun
        serving. One still starting (``started`` now or later) serves nothing yet but is not
        idle: stopping it throws its activation away with the requests waiting for it. Two
        models with queues on a full cluster stopped each other's starts every demand
        interval, neither ever serving (about 11,000 starts in the simulated warm-up hour at
        56 RPS)."""
        return sorted(
            r.instance
            for r in acc.instances.values()
            if r.instance and r.load == 0 and r.started < acc.time
        )

    def _preempt(
        self, snapshot: ClusterSnapshot, acc: Accounting, model: str, move: bool = True
    ) -> list[Action]:
        """No group is free for a waiting request: stop idle instances (:meth:`_spare`) where
        that frees the best group, then start there; failing that, :meth:`_move` busy ones if
        ``move``. The trial of where it would go starts from ``snapshot``: the one ``acc`` was made
        from (on demand) or what ``acc`` holds now (the tick, after the autoscaler's actions)."""
        spare = [i for i in self._spare(acc) if acc.instances[i].model != model]
        if not spare:
            return self._move(snapshot, acc, model) if move else []
        trial = Accounting(snapshot, self.config)  # where would it go with all of them stopped?
        self._score(trial, self.forecast(snapshot.time))
        for i in spare:
            trial.stop(i)
        found = place_start(trial, model)
        if not found:
            return self._move(snapshot, acc, model) if move else []
        group = set(found[-1].devices)
        out: list[Action] = []
        for i in spare:
            if group & set(acc.instances[i].devices):
                acc.stop(i)
                out.append(Stop(i))
        return out + place_start(acc, model)

    def _move(self, snapshot: ClusterSnapshot, acc: Accounting, model: str) -> list[Action]:
        """No group is free for a waiting request even with the idle instances stopped, though
        enough devices may be: busy instances of other models, one here and one there, leave no
        aligned group of the model's size (on the paper cluster a 70B burst waited ten minutes
        with seven GPUs free). Move the instances off the group that needs the fewest moves:
        each stops (its requests in flight finish there first) and starts again on a group
        outside it, and the waiting model starts on the group. Only instances that have served
        ``grace`` seconds and whose models have nothing queued move, so a move never delays
        requests already waiting, and an instance just moved is not moved back at once."""
        tp = self.models[model].tp
        free_devices = sum(1 for d in acc.order if not acc.dedicated(d))
        fc = self.forecast(snapshot.time)
        best: tuple[tuple, tuple[str, ...], list[str]] | None = None
        for k, g in enumerate(acc.groups(tp)):
            ids = sorted({r.instance for d in g for r in acc.on[d] if r.instance})
            moved = [acc.instances[i] for i in ids]
            if not moved or any(
                r.model == model
                or acc.time - r.started < self.config.grace
                or acc.queued.get(r.model, 0) > 0
                for r in moved
            ):
                continue
            # The moved instances need devices outside the group that serve nothing now.
            outside = free_devices - sum(1 for d in g if not acc.dedicated(d))
            if outside < sum(len(r.devices) for r in moved):
                continue
            key = (len(moved), math.fsum(r.load for r in moved), k)
            if best is not None and key >= best[0]:
                continue
            trial = Accounting(snapshot, self.config)
            self._score(trial, fc)
            for i in ids:
                trial.stop(i)
            if start_on(trial, model, g) and all(place_start(trial, r.model) for r in moved):
                best = (key, g, ids)
        if best is None:
            return []
        _, group, ids = best
        models = [acc.instances[i].model for i in ids]
        out: list[Action] = []
        for i in ids:
            acc.stop(i)
            out.append(Stop(i))
        out += start_on(acc, model, group)
        for m in models:
            out += place_start(acc, m)
        return out
