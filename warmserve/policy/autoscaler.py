"""Reactive autoscaling on the short-average load the snapshot carries.

Per model, with ``n`` instances whose capacities (``PolicyConfig.capacity``: what fits on each
one's devices) add up to ``slots``, and ``load`` the short-average concurrency (which counts
every request from its arrival, the queued ones included; never below the requests queued, so a
model with no instance and a request waiting scales up from zero):

- up: above ``scale_up * slots``, new instances until it falls back under it;
- down: below ``scale_down * slots`` (50% of the instances' capacity) for ``grace`` seconds,
  one instance stops (the least loaded, newest first), provided the ``n - 1`` left stay under
  ``scale_up`` of theirs, so a stop never triggers a start at the next tick. Below 50% the
  rest always have room once ``n >= 3`` of one capacity; for ``n == 2`` the load must also be
  under 80% of the one left;
- the last instance has no rest to take its load, so it stops only when the model has been
  idle (zero load, nothing queued) for ``idle`` seconds: the keep-alive of a serverless system,
  or the same grace for a policy that keeps the stopped weights and engine warm.

An instance also runs for at least ``grace`` seconds before it may stop. The only state kept
between ticks is when each model first went below its threshold, so the same sequence of
snapshots gives the same actions.
"""

from __future__ import annotations

from warmserve.policy.accounting import Accounting
from warmserve.policy.placement import place_start
from warmserve.policy.state import Action, Evict, Stop


class ReactiveAutoscaler:
    """Scale instances of every model up and down from its current load."""

    def __init__(
        self,
        grace: float,
        *,
        idle: float | None = None,
        drop_weights: bool = False,
        exclusive: bool = True,
    ):
        self.grace = grace  # seconds below scale-down before one of several instances stops
        self.idle = grace if idle is None else idle  # seconds idle before the last one stops
        self.drop_weights = drop_weights  # evict a stopped instance's weights from the devices
        self.exclusive = exclusive
        self._below_since: dict[str, float] = {}

    def scale(self, acc: Accounting) -> list[Action]:
        cfg = acc.config
        out: list[Action] = []
        busy = {m for m in acc.load if acc.load[m] > 0} | {m for m in acc.queued if acc.queued[m]}
        serving = {r.model for r in acc.instances.values()}
        for model in sorted((busy & set(acc.models)) | serving):
            insts = [r for r in acc.replicas.get(model, ()) if r.instance]
            n = len(insts)
            caps = {r.instance: acc.capacity(model, r.devices) for r in insts}
            slots = sum(caps.values())
            # Queued requests are in the load already (both the scheduler plugin and the
            # simulator count a request from its arrival): adding them counted each twice, and
            # one request waiting at capacity 2 started two instances.
            load = max(acc.load.get(model, 0.0), float(acc.queued.get(model, 0)))
            if load > cfg.scale_up * slots:
                self._below_since.pop(model, None)
                while load > cfg.scale_up * slots:
                    started = place_start(acc, model, exclusive=self.exclusive)
                    if not started:
                        break
                    out += started
                    slots += acc.capacity(model, started[-1].devices)
                continue
            ready = [r for r in insts if acc.time - r.started >= self.grace]
            victim = min(ready, key=lambda r: (r.load, -r.started, r.instance), default=None)
            if n == 1:
                shed, wait = load == 0, self.idle
            else:
                rest = slots - (caps[victim.instance] if victim else max(caps.values()))
                shed = load < cfg.scale_down * slots and load < cfg.scale_up * rest
                wait = self.grace
            if not (n and shed):
                self._below_since.pop(model, None)
                continue
            since = self._below_since.setdefault(model, acc.time)
            if acc.time - since < wait or victim is None:
                continue
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
