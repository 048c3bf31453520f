"""KV lending: a dedicated device keeps the KV its load needs and lends the rest to prewarming.

An instance reserves KV for its capacity (``PolicyConfig.capacity``: what fits on its devices, at
most ``instance_capacity`` requests), but most of the time it serves far fewer. Each tick, for
every dedicated device, the KV its instances need is
``kv_per_request * min(capacity, headroom * expected)``, where ``expected`` is the larger of the
instance's current load and its share of the model's forecast peak. Anything above that is lent
(a :class:`LendKV`) so prewarmed weights can use it; when the need rises above what is left, the
residents in the lent space with the lowest scores are evicted and the bytes reclaimed.

Lending happens only in steps of at least a tenth of the device's KV, so a load that wobbles
does not emit a lend/reclaim pair every tick. Between ticks, a request that finds a model's
instances full takes back the loans of those with a free slot at once (:func:`reclaim_for`),
before any new instance is started: the ledger's numbers are the same, but the instance admits
again at once instead of at the next tick.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from warmserve.policy.accounting import Accounting
from warmserve.policy.state import Action, Evict, LendKV, ReclaimKV


def kv_needed(acc: Accounting, device: str, expected: Mapping[str, float]) -> int:
    """KV bytes the instances on ``device`` need for their expected load."""
    cfg = acc.config
    need = 0
    for r in acc.on[device]:
        if not r.instance:
            continue
        spec = acc.models[r.model]
        n = sum(1 for x in acc.replicas[r.model] if x.instance)
        share = max(r.load, expected.get(r.model, 0.0) / max(n, 1))
        reqs = min(acc.capacity(r.model, r.devices), math.ceil(cfg.kv_headroom * share))
        need += math.ceil(reqs * cfg.kv_per_request(spec) / spec.tp)
    return need


def _reclaim(acc: Accounting, d: str, want: int) -> list[Action]:
    """Evict the lowest-scored residents of ``d`` until ``want`` lent bytes can come back."""
    out: list[Action] = []
    residents = sorted((r for r in acc.on[d] if not r.instance), key=lambda r: (r.score, r.model))
    for r in residents:
        if acc.free(d) >= want:
            break
        acc.evict(r.model, r.devices)
        out.append(Evict(r.model, r.devices))
    acc.reclaim(d, want)
    out.append(ReclaimKV(d, want))
    return out


def reclaim_for(acc: Accounting, model: str) -> list[Action]:
    """Take back the loans on the devices of ``model``'s instances that have a free slot (its
    requests are waiting). An instance holding its capacity of requests admits none whatever
    its KV space, so its loans stay: taking them back there evicted the weights prewarmed in
    them at every queued request of a busy model, for nothing."""
    out: list[Action] = []
    mine = sorted(
        {
            d
            for r in acc.replicas.get(model, ())
            if r.instance and r.load < acc.capacity(model, r.devices)
            for d in r.devices
        },
        key=acc.position.__getitem__,
    )
    for d in mine:
        if acc.lent[d] > 0:
            out += _reclaim(acc, d, acc.lent[d])
    return out


def adjust_lending(acc: Accounting, expected: Mapping[str, float]) -> list[Action]:
    """Lend spare KV of dedicated devices and reclaim what rising load needs back."""
    out: list[Action] = []
    for d in acc.order:
        if not acc.dedicated(d):
            continue
        lendable = acc.kv[d] - kv_needed(acc, d, expected)
        lent = acc.lent[d]
        if lendable > lent and lendable - lent >= acc.kv[d] // 10:
            acc.lend(d, lendable - lent)
            out.append(LendKV(d, lendable - lent))
        elif lendable < lent:
            out += _reclaim(acc, d, lent - max(lendable, 0))
    return out
