"""Evict-aware placement of prewarmed replicas and of new instances.

Both functions pick a TP group from :meth:`Accounting.groups` (aligned groups within a node, so
shards never span nodes), decide which resident replicas must go, record everything in the
ledger and return the actions in the order to enact them (Evicts first).

Prewarming ranks groups by, in order: whether the new replica outranks every resident it shares
devices with (its score is higher, so displacing them later would be right too); how many
instances it would sit beside (lent KV space is the last resort); the lowest sum of the scores it
overlaps (fewest valuable neighbours to compete with at activation); the fewest evictions. Only
residents with a lower score may be evicted, lowest first, and only when memory is short.

Starting an instance (a request is waiting) takes the warmest group (ENGINE > DEVICE > HOST >
DISK), then the one whose evictions cost the least score. Any resident may be evicted for it.
"""

from __future__ import annotations

from warmserve.policy.accounting import Accounting, Replica
from warmserve.policy.state import Action, Evict, Prewarm, Start, Tier


def _make_room(
    acc: Accounting, group: tuple[str, ...], need: int, candidates: list[Replica], forced: list
) -> list[Replica] | None:
    """Victims, ``forced`` first then ``candidates`` in order, until ``need`` bytes fit on
    every device of ``group``; None if they cannot."""
    victims = list(forced)
    freed = dict.fromkeys(group, 0)
    for r in victims:
        shard = acc.shard(r.model)
        for d in r.devices:
            if d in freed:
                freed[d] += shard
    pending = iter(candidates)
    while any(acc.free(d) + freed[d] < need for d in group):
        r = next(pending, None)
        if r is None:
            return None
        if r in victims or not any(d in freed for d in r.devices):
            continue
        victims.append(r)
        shard = acc.shard(r.model)
        for d in r.devices:
            if d in freed:
                freed[d] += shard
    return victims


def _evict_all(acc: Accounting, victims: list[Replica]) -> list[Action]:
    out: list[Action] = []
    for r in victims:
        acc.evict(r.model, r.devices)
        out.append(Evict(r.model, r.devices))
    return out


def place_prewarm(
    acc: Accounting,
    model: str,
    score: float,
    *,
    evict: bool = True,
    dedicated: bool = True,
    tier: Tier = Tier.DEVICE,
) -> list[Action]:
    """Prewarm one more replica of ``model``; [] if no group can take it.

    ``evict=False`` is first fit with no displacement (the no-placement ablation);
    ``dedicated=False`` keeps prewarms out of lent KV space.
    """
    spec = acc.models[model]
    shard = acc.shard(model)
    best: tuple | None = None
    best_group: tuple[str, ...] | None = None
    best_victims: list[Replica] = []
    group = acc.empty_group(spec.tp, shard)
    if group is None:
        for g in acc.groups(spec.tp):
            over = acc.overlapping(g)
            if any(r.model == model for r in over):
                continue
            n_inst = sum(1 for r in over if r.instance)
            if n_inst and not dedicated:
                continue
            conflicts = acc.conflicts(g)
            if conflicts and (not evict or any(r.instance or r.score >= score for r in conflicts)):
                continue
            lower = sorted(
                (r for r in over if not r.instance and r.score < score),
                key=lambda r: (r.score, r.model),
            )
            victims = _make_room(acc, g, shard, lower if evict else [], conflicts)
            if victims is None:
                continue
            residents = [r for r in over if not r.instance]
            outranks = all(r.score < score for r in residents)
            key = (not outranks, n_inst, sum(r.score for r in residents), len(victims))
            if best is None or key < best:
                best, best_group, best_victims = key, g, victims
                if not evict or key == (False, 0, 0.0, 0):
                    break
        group = best_group
    if group is None:
        return []
    out = _evict_all(acc, best_victims)
    acc.prewarm(model, group, tier, score)
    out.append(Prewarm(model, group, tier))
    return out


def place_start(acc: Accounting, model: str, *, exclusive: bool = True) -> list[Action]:
    """Start an instance of ``model`` on the warmest group that can hold it; [] if none.

    ``exclusive`` keeps one instance per device (WarmServe's dedicated mode); the sharing
    baseline turns it off.
    """
    spec = acc.models[model]
    shard, kv = acc.shard(model), acc.kv_shard(model)
    cached = any(model in c for c in acc.host.values())
    ideal = (-int(Tier.ENGINE), 0.0, 0)
    fallback = (-int(Tier.HOST if cached else Tier.DISK), 0.0, 0)
    own = [r.devices for r in acc.replicas.get(model, ()) if r.instance is None]
    best: tuple | None = None
    best_group: tuple[str, ...] | None = None
    best_victims: list[Replica] = []
    for i, g in enumerate([*own, *acc.groups(spec.tp)]):
        if i == len(own) and best is not None and best[0] <= -int(Tier.DEVICE):
            break  # weights already in place beat any load
        over = acc.overlapping(g)
        mine = acc.resident_replica(model, g)
        if any(r.model == model and r is not mine for r in over):
            continue
        if exclusive and any(r.instance for r in over):
            continue
        conflicts = acc.conflicts(g, ignore=mine)
        if any(r.instance for r in conflicts):
            continue
        others = sorted(
            (r for r in over if not r.instance and r is not mine), key=lambda r: (r.score, r.model)
        )
        victims = _make_room(acc, g, kv + (0 if mine else shard), others, conflicts)
        if victims is None:
            continue
        key = (-int(acc.tier(model, g)), sum(r.score for r in victims), len(victims))
        if best is None or key < best:
            best, best_group, best_victims = key, g, victims
            if key <= ideal or (mine is None and key == fallback):
                break
    if best_group is None:
        return []
    out = _evict_all(acc, best_victims)
    acc.start(model, best_group)
    out.append(Start(model, best_group))
    return out
