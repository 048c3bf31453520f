"""The two systems WarmServe is compared with, behind the same Policy protocol.

- :class:`AutoscalePolicy` (ServerlessLLM-style): no forecast, no device prewarming. A request
  that finds no instance starts one on the warmest group (checkpoints the node keeps in host
  memory load much faster than from disk); an instance stops after ``keep_alive`` idle seconds and
  its weights leave the device but stay in the node's host memory (the enactor keeps that cache,
  most recently used first).
- :class:`SharePolicy` (MuxServe-style): a static layout, decided once from popularity. Every
  device is split into ``share_slots`` equal parts; a model fits a part if its weight shard plus
  KV shard does. Models take parts in order of popularity (the load observed so far, then
  registry order), one instance each first, then extra instances for the most popular ones
  while parts remain. Instances are started at the first ticks and never moved; a request for a
  model without a part waits (``on_demand`` returns []).
"""

from __future__ import annotations

from collections.abc import Mapping

from warmserve.policy.accounting import Accounting, InfeasibleAction
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
        self.autoscaler = ReactiveAutoscaler(self.config.keep_alive, drop_weights=True)

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        """Nothing to learn: this baseline does not forecast."""

    def plan(self, snapshot: ClusterSnapshot) -> list[Action]:
        return self.autoscaler.scale(Accounting(snapshot, self.config))

    def on_demand(self, snapshot: ClusterSnapshot, model: str) -> list[Action]:
        return place_start(Accounting(snapshot, self.config), model)


class SharePolicy:
    """Static colocation by popularity with a fixed memory split per device."""

    name = "share"

    def __init__(self, models: Mapping[str, ModelSpec], config: PolicyConfig | None = None):
        self.models = models
        self.config = config or PolicyConfig()
        self._popularity: dict[str, float] = {}
        self._layout: list[tuple[str, tuple[str, ...]]] | None = None

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        if self._layout is None:
            self._popularity[model] = self._popularity.get(model, 0.0) + avg

    def layout(self, snapshot: ClusterSnapshot) -> list[tuple[str, tuple[str, ...]]]:
        """(model, group) of every instance, decided on the first call and kept."""
        if self._layout is not None:
            return self._layout
        acc = Accounting(snapshot, self.config)
        order = list(self.models)
        order.sort(key=lambda m: -self._popularity.get(m, 0.0))
        used = dict.fromkeys(acc.order, 0)
        layout: list[tuple[str, tuple[str, ...]]] = []
        rounds = [order]  # one instance each, then rounds of extras while parts remain
        while rounds:
            placed = False
            for model in rounds.pop():
                group = self._slot(acc, model, used)
                if group is not None:
                    layout.append((model, group))
                    for d in group:
                        used[d] += 1
                    placed = True
            if placed:
                rounds.append(order)
        self._layout = layout
        return layout

    def _slot(self, acc: Accounting, model: str, used: dict[str, int]) -> tuple[str, ...] | None:
        """The first group with a free part on every device that the model fits."""
        need = acc.shard(model) + acc.kv_shard(model)
        for g in acc.groups(acc.models[model].tp):
            if any(used[d] >= self.config.share_slots for d in g):
                continue
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
        acc = Accounting(snapshot, self.config)
        out: list[Action] = []
        for model, group in self.layout(snapshot):
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
