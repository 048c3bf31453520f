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
compute, with numpy over :meth:`Accounting.group_stats` (which the ledger keeps up to date as
replicas come and go), a lower bound of every group's key, and drop groups that cannot fit even
after evicting every resident they may evict. They weigh the group with the least bound exactly;
when its key is its bound (as for a prewarm beside residents it cannot evict) nothing can beat
it. Otherwise they weigh the groups bounded below the best key so far, in order of their bound:
the choice is the one a full scan makes, at the cost of the few groups that could still win.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from warmserve.policy.accounting import Accounting, Replica
from warmserve.policy.state import Action, Evict, Prewarm, Start, Tier

Bounds = tuple[np.ndarray, ...]  # per group, columns of a lower bound of its ranking key
Choice = tuple[tuple, tuple[str, ...], list[Replica]]  # exact key with the index, group, victims
_PROBES = 3  # least-bound groups weighed one by one before the rest are sorted


def _make_room(
    acc: Accounting,
    group: tuple[str, ...],
    need: dict[str, int],
    candidates: list[Replica],
    forced: list,
    family: str | None = None,
) -> list[Replica] | None:
    """Victims, ``forced`` first then ``candidates`` in order, until ``need[d]`` bytes, and an
    engine of ``family`` where none would be up, fit on every device ``d`` of ``group``; None if
    they cannot.

    An engine goes with the last replica of its family on a device (:meth:`Accounting.evict`),
    so evicting that frees the engine's bytes too, and a family whose engine goes needs a new
    one. Counting only the weights, a start whose KV fills what its device has beside the
    weights and an engine (its capacity bound by memory) never found room beside a resident of
    another family, though evicting it would free the whole device."""
    victims = list(forced)
    chosen = set(victims)
    pending = iter(candidates)
    while not all(_fits(acc, d, need[d], chosen, family) for d in group):
        r = next(pending, None)
        if r is None:
            return None
        if r in chosen or not any(d in need for d in r.devices):
            continue
        victims.append(r)
        chosen.add(r)
    return victims


def _fits(acc: Accounting, d: str, need: int, gone: set[Replica], family: str | None) -> bool:
    """Whether ``need`` bytes, and an engine of ``family`` unless one stays up, fit on ``d``
    once the replicas ``gone`` are evicted."""
    free = acc.free(d)
    left: set[str] = set()
    dropped: set[str] = set()
    for r in acc.on[d]:
        f = acc.models[r.model].family
        if r in gone:
            free += acc.shard(r.model)
            dropped.add(f)
        else:
            left.add(f)
    engines = acc.engines[d]
    dropped = {f for f in dropped - left if f in engines}
    free += acc.config.engine_bytes * len(dropped)
    if family is not None and (family not in engines or family in dropped):
        need += acc.config.engine_bytes
    return free >= need


def _exclude_holding(acc: Accounting, model: str, tp: int, feasible: np.ndarray) -> None:
    """Clear the groups of size ``tp`` that share a device with a replica of ``model`` (a
    model has at most one replica on a device)."""
    of = acc.group_of(tp)[0]
    for r in acc.replicas.get(model, ()):
        for d in r.devices:
            j = of[acc.position[d]]
            if j >= 0:
                feasible[j] = False


def _evict_all(acc: Accounting, victims: list[Replica]) -> list[Action]:
    out: list[Action] = []
    for r in victims:
        acc.evict(r.model, r.devices)
        out.append(Evict(r.model, r.devices))
    return out


def _by_bound(bounds: Bounds, cand: np.ndarray) -> list[int]:
    """Groups ``cand`` (ascending) sorted by their lower-bound key (first column most
    significant), then group order."""
    order = np.lexsort([cand, *(b[cand] for b in reversed(bounds))])
    return cand[order].tolist()


def _first(bounds: Bounds, cand: np.ndarray) -> int:
    """The group of ``cand`` (ascending) with the least lower-bound key, the first of equals."""
    for b in bounds:
        if len(cand) == 1:
            break
        v = b[cand]
        cand = cand[v == v.min()]
    return int(cand[0])


def _below(bounds: Bounds, key: tuple, cand: np.ndarray, offset: int) -> np.ndarray:
    """The groups of ``cand`` whose lower-bound key, with ``offset`` plus the group's index
    last, is below ``key``."""
    less = np.zeros(len(cand), bool)
    same = np.ones(len(cand), bool)
    for b, k in zip(bounds, key[:-1], strict=True):
        v = b[cand]
        less |= same & (v < k)
        same &= v == k
    return cand[less | (same & (cand + offset < key[-1]))]


def _least(
    groups: list[tuple[str, ...]],
    bounds: Bounds,
    feasible: np.ndarray,
    exact: Callable[[tuple[str, ...]], tuple[tuple, list[Replica]] | None],
    best: Choice | None = None,
    offset: int = 0,
) -> Choice | None:
    """The group with the least exact key (``exact``'s, then ``offset`` plus the group's
    index), its key and victims, among ``best`` and the ``feasible`` groups: the choice a scan
    of every group makes.

    Without ``best``, the group with the least bound is weighed first (ranking a thousand
    groups costs more than weighing one); when it fits, only the groups bounded below its key
    can beat it, none if its bound is its key. Those are then weighed in order of their bound,
    up to the first bound above the best key so far."""
    cand = np.flatnonzero(feasible)
    for _ in range(0 if best else _PROBES):
        if not len(cand):
            return None
        i = _first(bounds, cand)
        cand = cand[cand != i]
        found = exact(groups[i])
        if found is not None:
            if found[0] == tuple(b[i] for b in bounds):
                return (*found[0], offset + i), groups[i], found[1]  # no bound is below
            best = ((*found[0], offset + i), groups[i], found[1])
            break
    if best is not None:
        cand = _below(bounds, best[0], cand, offset)
    for i in _by_bound(bounds, cand):
        if best is not None and (*(b[i] for b in bounds), offset + i) > best[0]:
            break
        found = exact(groups[i])
        if found is not None and (best is None or (*found[0], offset + i) < best[0]):
            best = ((*found[0], offset + i), groups[i], found[1])
    return best


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
    need = dict.fromkeys(g, acc.shard(model))
    family = acc.models[model].family if engine else None
    victims = _make_room(acc, g, need, lower if evict else [], conflicts, family)
    if victims is None:
        return None
    residents = [r for r in over if not r.instance]
    outranks = all(r.score < score for r in residents)
    # Summed in the order of ``over``, as GroupStats.rsum is, so a bound can equal the key.
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
        groups, st = acc.groups(tp), acc.group_stats(tp)
        fits = st.free >= shard
        # Only residents scored below it may go, so a group short of room needs one there.
        feasible = fits | ((st.room >= shard) & (st.rmin < score)) if evict else fits.copy()
        if not dedicated:
            feasible &= st.inst == 0
        _exclude_holding(acc, model, tp, feasible)

        def exact(g: tuple[str, ...]) -> tuple[tuple, list[Replica]] | None:
            return _prewarm_key(acc, g, model, score, evict, dedicated, engine)

        if evict:
            bounds = (st.rmax >= score, st.inst, st.rsum, ~fits)
            best = _least(groups, bounds, feasible, exact)
            if best is not None:
                _, group, victims = best
        else:  # first fit: group order, no ranking
            for i in np.flatnonzero(feasible).tolist():
                found = exact(groups[i])
                if found is not None:
                    group, victims = groups[i], found[1]
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
    if acc.capacity(model, g) < 1:
        return None  # its devices cannot hold even one request's KV beside the weights
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
    need = dict.fromkeys(g, acc.kv_shard(model, g) + (0 if mine else acc.shard(model)))
    victims = _make_room(acc, g, need, others, conflicts, acc.models[model].family)
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
        groups, st = acc.groups(spec.tp), acc.group_stats(spec.tp)
        kv, fits = _kv_shards(acc, model, spec.tp)
        need = acc.shard(model) + kv
        feasible = fits & (st.room >= need)
        if exclusive:
            feasible &= st.inst == 0
        _exclude_holding(acc, model, spec.tp, feasible)
        gi = acc.group_index(spec.tp)
        cached = np.array([model in acc.host[n] for n in acc.nodes], bool)
        tier = np.where(cached[acc.node_of[gi[:, 0]]], -int(Tier.HOST), -int(Tier.DISK))
        if exclusive:  # every resident on the group is lost (summed in another order)
            cost = st.rsum * (1 - 1e-9)
        else:  # a victim on every device that is short
            ix = acc.device_index()
            short = ix.free[gi] < need[:, None]
            cost = np.where(short, ix.rmin[gi], 0.0).max(axis=1) * (1 - 1e-9)
        bounds = (tier, cost, st.free < need)

        def exact(g: tuple[str, ...]) -> tuple[tuple, list[Replica]] | None:
            return _start_key(acc, g, model, exclusive)

        chosen = (best, best_group, best_victims) if best_group is not None else None
        chosen = _least(groups, bounds, feasible, exact, chosen, offset=len(own))
        if chosen is not None:
            best, best_group, best_victims = chosen
    if best_group is None:
        return []
    out = _evict_all(acc, best_victims)
    acc.start(model, best_group)
    out.append(Start(model, best_group))
    return out


def _kv_shards(acc: Accounting, model: str, tp: int) -> tuple[np.ndarray, np.ndarray]:
    """The KV shard an instance of ``model`` reserves on each group of size ``tp`` (it follows
    the group's smallest device, :meth:`Accounting.kv_shard`), and whether the group's devices
    are large enough for one request at all."""
    memory = np.fromiter(acc.memory.values(), np.int64, len(acc.memory))[acc.group_index(tp)]
    smallest = memory.min(axis=1) if memory.size else np.zeros(0, np.int64)
    sizes, at = np.unique(smallest, return_inverse=True)  # few sizes: one rule call each
    spec = acc.models[model]
    kv = np.array([acc.kv_shard_at(model, int(m)) for m in sizes], np.int64)
    fits = np.array([acc.config.capacity(spec, int(m)) >= 1 for m in sizes], bool)
    return kv[at], fits[at]


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
