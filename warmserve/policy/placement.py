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
DISK), then the one that costs the least score: with one instance per device (``exclusive``)
every other resident of the group is lost to it, evicted or blocked from starting while it
serves, so the sum of all their scores counts; otherwise that of the evicted. Any resident may
be evicted for it.

Ties go to the group that comes first in :meth:`Accounting.groups`. A full cluster has about a
thousand groups, too many to weigh one by one in Python every tick, so both functions first
compute, with numpy over :meth:`Accounting.device_index`, a lower bound of every group's key and
drop groups that cannot fit even after evicting every resident. They then weigh groups exactly in
order of that bound and stop at the first bound above the best exact key: the choice is the one a
full scan makes, at the cost of the few groups that could still win.
"""

from __future__ import annotations

import numpy as np

from warmserve.policy.accounting import Accounting, Replica
from warmserve.policy.state import Action, Evict, Prewarm, Start, Tier


def _make_room(
    acc: Accounting,
    group: tuple[str, ...],
    need: dict[str, int],
    candidates: list[Replica],
    forced: list,
) -> list[Replica] | None:
    """Victims, ``forced`` first then ``candidates`` in order, until ``need[d]`` bytes fit on
    every device ``d`` of ``group``; None if they cannot."""
    victims = list(forced)
    freed = dict.fromkeys(group, 0)
    for r in victims:
        shard = acc.shard(r.model)
        for d in r.devices:
            if d in freed:
                freed[d] += shard
    pending = iter(candidates)
    while any(acc.free(d) + freed[d] < need[d] for d in group):
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


def _by_bound(bounds: list[np.ndarray], feasible: np.ndarray) -> list[int]:
    """Indices of feasible groups, sorted by their lower-bound key (first column most
    significant), then group order."""
    cand = np.flatnonzero(feasible)
    order = np.lexsort([cand, *(b[cand] for b in reversed(bounds))])
    return cand[order].tolist()


def _prewarm_key(
    acc: Accounting,
    g: tuple[str, ...],
    model: str,
    score: float,
    evict: bool,
    dedicated: bool,
    engine: bool,
) -> tuple[tuple, list[Replica]] | None:
    """Exact ranking key of prewarming ``model`` on ``g`` and the victims; None if it cannot."""
    over = acc.overlapping(g)
    if any(r.model == model for r in over):
        return None
    n_inst = sum(1 for r in over if r.instance)
    if n_inst and not dedicated:
        return None
    conflicts = acc.conflicts(g)
    if conflicts and (not evict or any(r.instance or r.score >= score for r in conflicts)):
        return None
    lower = sorted(
        (r for r in over if not r.instance and r.score < score), key=lambda r: (r.score, r.model)
    )
    shard = acc.shard(model)
    need = {d: shard + (acc.engine_need(model, d) if engine else 0) for d in g}
    victims = _make_room(acc, g, need, lower if evict else [], conflicts)
    if victims is None:
        return None
    residents = [r for r in over if not r.instance]
    outranks = all(r.score < score for r in residents)
    return (not outranks, n_inst, sum(r.score for r in residents), len(victims)), victims


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
    ``dedicated=False`` keeps prewarms out of lent KV space. ``tier`` ENGINE also brings an
    engine of the model's family up there, so a start is an in-place switch.
    """
    tp = acc.models[model].tp
    shard = acc.shard(model)
    engine = tier == Tier.ENGINE
    victims: list[Replica] = []
    group = acc.empty_group(tp, shard + (acc.config.engine_bytes if engine else 0))
    if group is None:
        groups, gi, ix = acc.groups(tp), acc.group_index(tp), acc.device_index()
        free = ix.free[gi]
        fits = free.min(axis=1) >= shard
        n_inst = ix.inst[gi].max(axis=1)  # distinct instances overlapping: at least this many
        feasible = (free + ix.rbytes[gi]).min(axis=1) >= shard if evict else fits
        if not dedicated:
            feasible &= n_inst == 0
        if not evict:  # first fit: group order, no ranking
            order = np.flatnonzero(feasible).tolist()
            bound = None
        else:
            outranked = ix.rmax[gi].max(axis=1) >= score
            rsum = ix.rsum[gi].max(axis=1) * (1 - 1e-9)  # distinct residents score at least this
            bound = (outranked, n_inst, rsum, ~fits)
            order = _by_bound(list(bound), feasible)
        best: tuple | None = None
        for i in order:
            if bound is not None and best is not None:
                lb = (bool(bound[0][i]), int(bound[1][i]), float(bound[2][i]), int(bound[3][i]), i)
                if lb > best:
                    break
            found = _prewarm_key(acc, groups[i], model, score, evict, dedicated, engine)
            if found is None:
                continue
            key = (*found[0], i)
            if best is None or key < best:
                best, group, victims = key, groups[i], found[1]
                if bound is None:
                    break
    if group is None:
        return []
    out = _evict_all(acc, victims)
    acc.prewarm(model, group, tier, score)
    out.append(Prewarm(model, group, tier))
    return out


def _start_key(
    acc: Accounting, g: tuple[str, ...], model: str, exclusive: bool
) -> tuple[tuple, list[Replica]] | None:
    """Exact ranking key of starting ``model`` on ``g`` and the victims; None if it cannot."""
    over = acc.overlapping(g)
    mine = acc.resident_replica(model, g)
    if any(r.model == model and r is not mine for r in over):
        return None
    if exclusive and any(r.instance for r in over):
        return None
    conflicts = acc.conflicts(g, ignore=mine)
    if any(r.instance for r in conflicts):
        return None
    others = sorted(
        (r for r in over if not r.instance and r is not mine), key=lambda r: (r.score, r.model)
    )
    base = acc.kv_shard(model) + (0 if mine else acc.shard(model))
    need = {d: base + acc.engine_need(model, d) for d in g}
    victims = _make_room(acc, g, need, others, conflicts)
    if victims is None:
        return None
    # An exclusive instance blocks every other resident on its devices from starting, evicted
    # or not: weigh what all of them are worth, so bursts of small models do not sit on the
    # prewarmed shards of a large one.
    lost = others if exclusive else victims
    return (-int(acc.tier(model, g)), sum(r.score for r in lost), len(victims)), victims


def place_start(acc: Accounting, model: str, *, exclusive: bool = True) -> list[Action]:
    """Start an instance of ``model`` on the warmest group that can hold it; [] if none.

    Its own resident replicas are weighed first: weights already in place beat any load. Other
    groups holding the model on some device cannot take it; the rest load from the node's host
    memory or disk. ``exclusive`` keeps one instance per device (WarmServe's dedicated mode);
    the sharing baseline turns it off.
    """
    spec = acc.models[model]
    best: tuple | None = None
    best_group: tuple[str, ...] | None = None
    best_victims: list[Replica] = []
    own = sorted(
        (r.devices for r in acc.replicas.get(model, ()) if r.instance is None),
        key=lambda g: acc.position[g[0]],
    )
    for k, g in enumerate(own):
        found = _start_key(acc, g, model, exclusive)
        if found is not None and (best is None or (*found[0], k) < best):
            best, best_group, best_victims = (*found[0], k), g, found[1]
    if best is None or best[0] > -int(Tier.DEVICE):
        groups, gi, ix = acc.groups(spec.tp), acc.group_index(spec.tp), acc.device_index()
        need = acc.shard(model) + acc.kv_shard(model)
        free = ix.free[gi]
        feasible = (free + ix.rbytes[gi]).min(axis=1) >= need
        if exclusive:
            feasible &= ix.inst[gi].max(axis=1) == 0
        holding = np.zeros(len(acc.order), bool)
        holding[[acc.position[d] for r in acc.replicas.get(model, ()) for d in r.devices]] = True
        feasible &= ~holding[gi].any(axis=1)
        cached = np.array([model in acc.host[n] for n in acc.nodes], bool)
        tier = np.where(cached[acc.node_of[gi[:, 0]]], -int(Tier.HOST), -int(Tier.DISK))
        if exclusive:  # every resident on the group is lost: at least the largest device's sum
            cost = ix.rsum[gi].max(axis=1) * (1 - 1e-9)
        else:  # a victim on every device that is short
            cost = np.where(free < need, ix.rmin[gi], 0.0).max(axis=1) * (1 - 1e-9)
        short = free < need
        bound = (tier, cost, short.any(axis=1))
        for i in _by_bound(list(bound), feasible):
            lb = (int(bound[0][i]), float(bound[1][i]), int(bound[2][i]), len(own) + i)
            if best is not None and lb > best:
                break
            found = _start_key(acc, groups[i], model, exclusive)
            if found is not None and (best is None or (*found[0], len(own) + i) < best):
                best, best_group, best_victims = (*found[0], len(own) + i), groups[i], found[1]
    if best_group is None:
        return []
    out = _evict_all(acc, best_victims)
    acc.start(model, best_group)
    out.append(Start(model, best_group))
    return out


def start_on(acc: Accounting, model: str, group: tuple[str, ...]) -> list[Action]:
    """Start an instance of ``model`` on exactly ``group`` (one instance per device), evicting
    the residents in the way; [] if it cannot go there."""
    found = _start_key(acc, group, model, exclusive=True)
    if found is None:
        return []
    out = _evict_all(acc, found[1])
    acc.start(model, group)
    out.append(Start(model, group))
    return out
