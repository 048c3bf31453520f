"""Reactive autoscaling on the short-average load the snapshot carries.

A model whose load (plus queued requests) exceeds ``scale_up`` of its instances' capacity gets
enough new instances to fall back under it; one whose load stays under ``scale_down`` for
``grace`` seconds loses one instance at a time (the least loaded, newest first), down to zero
when the load is zero. The only state kept between ticks is when each model first went below
the threshold, so the same sequence of snapshots gives the same actions.
"""

from __future__ import annotations

import math

from warmserve.policy.accounting import Accounting
from warmserve.policy.placement import place_start
from warmserve.policy.state import Action, Evict, Stop


class ReactiveAutoscaler:
    """Scale instances of every model up and down from its current load."""

    def __init__(self, grace: float, *, drop_weights: bool = False, exclusive: bool = True):
        self.grace = grace  # seconds below scale-down before an instance stops
        self.drop_weights = drop_weights  # evict a stopped instance's weights from the devices
        self.exclusive = exclusive
        self._below_since: dict[str, float] = {}

    def scale(self, acc: Accounting) -> list[Action]:
        cfg = acc.config
        cap = cfg.instance_capacity
        out: list[Action] = []
        busy = {m for m in acc.models if acc.load.get(m, 0.0) + acc.queued.get(m, 0) > 0}
        serving = {r.model for r in acc.instances.values()}
        for model in sorted(busy | serving):
            insts = [r for r in acc.replicas.get(model, ()) if r.instance]
            n = len(insts)
            load = acc.load.get(model, 0.0) + acc.queued.get(model, 0)
            if load > cfg.scale_up * cap * n:
                self._below_since.pop(model, None)
                for _ in range(math.ceil(load / (cfg.scale_up * cap)) - n):
                    started = place_start(acc, model, exclusive=self.exclusive)
                    if not started:
                        break
                    out += started
                continue
            can_shed = load == 0 if n == 1 else load < cfg.scale_up * cap * (n - 1)
            if not (n and load < cfg.scale_down * cap * n and can_shed):
                self._below_since.pop(model, None)
                continue
            since = self._below_since.setdefault(model, acc.time)
            ready = [r for r in insts if acc.time - r.started >= self.grace]
            if acc.time - since < self.grace or not ready:
                continue
            victim = min(ready, key=lambda r: (r.load, -r.started, r.instance))
            acc.stop(victim.instance)
            out.append(Stop(victim.instance))
            if self.drop_weights:
                acc.evict(model, victim.devices)
                out.append(Evict(model, victim.devices))
            self._below_since[model] = acc.time
        for model in list(self._below_since):
            if model not in serving:
                del self._below_since[model]
        return out
