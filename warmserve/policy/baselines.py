"""The two systems WarmServe is compared with, behind the same Policy protocol.

- :class:`AutoscalePolicy` (ServerlessLLM-style): no forecast, no device prewarming. A request
  that finds no instance starts one on the warmest group (checkpoints the node keeps in host
  memory load much faster than from disk). Extra instances stop on the reactive autoscaler's
  scale-down rule (below 50% of their capacity for ``grace`` seconds), the last one after
  ``keep_alive`` idle seconds; a stopped instance's weights leave the device but stay in the
  node's host memory (the enactor keeps that cache, most recently used first).
- :class:`SharePolicy` (MuxServe-style): a static layout, decided from popularity. Every
  device is split into ``share_slots`` equal parts; a model fits a part if its weight shard plus
  KV shard does. Models take parts in order of popularity (the load observed so far, then
  registry order), one instance each first, then extra instances for the most popular ones
  while parts remain. Instances are started at the first ticks and never moved; the layout is
  made again only when the set of devices changes (workers joining or leaving a live cluster).
  A request for a model without a part waits (``on_demand`` returns []).
"""

from __future__ import annotations

from collections.abc import Mapping

from warmserve.policy.accounting import Accounting, InfeasibleAction, LedgerCache
from warmserve.policy.autoscaler import ReactiveAutoscaler
from warmserve.policy.config import PolicyConfig
from warmserve.policy.placement import place_start
from warmserve.policy.state import Action, ClusterSnapshot, Start
from warmserve.registry import ModelSpec


class AutoscalePolicy:
    """Load on demand, keep alive, fall back to the host-memory cache."""

    name = "autoscale"

    def __init__(self, models: Mapping[str, ModelSpec], config: PolicyConfig | None = None):
        self.models = models
        self.config = config or PolicyConfig()
        self.autoscaler = ReactiveAutoscaler(
            self.config.grace, idle=self.config.keep_alive, drop_weights=True
        )
        self._ledgers = LedgerCache(self.config)

    def prepare(self) -> None:
        """Nothing to compile: this baseline does not forecast."""

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        """Nothing to learn: this baseline does not forecast."""

    def plan(self, snapshot: ClusterSnapshot) -> list[Action]:
        return self.autoscaler.scale(self._ledgers.ledger(snapshot))

    def on_demand(self, snapshot: ClusterSnapshot, model: str) -> list[Action]:
        return place_start(self._ledgers.ledger(snapshot), model)


class SharePolicy:
    """Static colocation by popularity with a fixed memory split per device."""

    name = "share"

    def __init__(self, models: Mapping[str, ModelSpec], config: PolicyConfig | None = None):
        self.models = models
        self.config = config or PolicyConfig()
        self._popularity: dict[str, float] = {}
        self._layout: list[tuple[str, tuple[str, ...]]] = []
        self._devices: tuple | None = None  # the device set the layout was made for
        self._ledgers = LedgerCache(self.config)

    def prepare(self) -> None:
        """Nothing to compile: this baseline does not forecast."""

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        self._popularity[model] = self._popularity.get(model, 0.0) + avg

    def layout(self, snapshot: ClusterSnapshot) -> list[tuple[str, tuple[str, ...]]]:
        """(model, group) of every instance, kept while the set of devices stays the same.

        A live cluster's first tick may come before any worker has joined, and workers come and
        go: when the devices change, the layout is made again around the instances that serve
        now (they keep their places), filling the parts that are free."""
        key = tuple((d.id, d.node, d.memory) for d in snapshot.devices)
        if key == self._devices:
            return self._layout
        acc = Accounting(snapshot, self.config)
        order = list(self.models)
        order.sort(key=lambda m: -self._popularity.get(m, 0.0))
        used = dict.fromkeys(acc.order, 0)
        layout = [(i.model, tuple(i.devices)) for i in snapshot.instances]
        count = dict.fromkeys(order, 0)
        for model, group in layout:
            count[model] = count.get(model, 0) + 1
            for d in group:
                used[d] += 1
        # Round k gives a model its k-th instance: one each first, then extras while parts remain.
        k = 1
        while True:
            placed = False
            for model in order:
                if count[model] >= k:
                    continue
                group = self._slot(acc, model, used)
                if group is not None:
                    layout.append((model, group))
                    count[model] += 1
                    for d in group:
                        used[d] += 1
                    placed = True
            if not placed and k > max(count.values(), default=0):
                break
            k += 1
        self._layout = layout
        self._devices = key
        return layout

    def _slot(self, acc: Accounting, model: str, used: dict[str, int]) -> tuple[str, ...] | None:
        """The first group with a free part on every device that the model fits."""
        for g in acc.groups(acc.models[model].tp):
            if any(used[d] >= self.config.share_slots for d in g):
                continue
            need = acc.shard(model) + acc.kv_shard(model, g)
            if any(need > acc.memory[d] // self.config.share_slots for d in g):
                continue
            if any(acc.replica_on(model, d) for d in g):
                continue
            try:
                acc.start(model, g)
            except InfeasibleAction:
                continue
            return g
        return None

    def plan(self, snapshot: ClusterSnapshot) -> list[Action]:
        layout = self.layout(snapshot)
        acc = self._ledgers.ledger(snapshot)
        out: list[Action] = []
        for model, group in layout:
            if any(r.instance for d in group for r in acc.on[d] if r.model == model):
                continue
            try:
                acc.start(model, group)
            except InfeasibleAction:
                continue
            out.append(Start(model, group))
        return out

    def on_demand(self, snapshot: ClusterSnapshot, model: str) -> list[Action]:
        """The layout is static: requests wait for the model's planned instances."""
        return []
