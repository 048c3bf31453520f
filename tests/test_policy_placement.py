"""Placement picks what a scan of every group by its exact key picks, for random ledgers.

:mod:`warmserve.policy.placement` weighs only the groups whose lower bounds (from
:meth:`Accounting.group_stats`, kept up to date as replicas come and go) could still win; a
bound above the exact key would silently change the choice. The references here weigh every
group, in order, with the same exact keys.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmserve.policy.accounting import Accounting, aligned_groups
from warmserve.policy.config import PolicyConfig
from warmserve.policy.placement import _prewarm_key, _start_key, place_prewarm, place_start
from warmserve.policy.state import ClusterSnapshot, DeviceSnapshot, InstanceSnapshot, Tier
from warmserve.registry import ModelSpec

GB = 10**9
CONFIG = PolicyConfig(engine_bytes=GB)
SCORES = (0.0, 0.5, 1.0, 1.0, 2.5, 7.0)  # few values, so sums and bounds tie often


@st.composite
def ledgers(draw):
    """A ledger of random residents and instances (snapshot chunks may not nest), scored."""
    per_node = draw(st.sampled_from([1, 2, 4, 8, 8]))
    n_nodes = draw(st.integers(1, 4))
    memory = draw(st.sampled_from([24, 80, 160, 160])) * GB
    models = {}
    for i in range(draw(st.integers(2, 10))):
        tp = draw(st.sampled_from([t for t in (1, 2, 3, 4) if t <= per_node]))
        nbytes = draw(st.integers(1, 40)) * GB
        models[f"m{i}"] = ModelSpec(f"m{i}", f"f{i % 2}", nbytes, tp)
    names = list(models)
    full = draw(st.sampled_from([0, 1, 1, 1]))  # most groups then hold something: ranking decides
    devices = []
    for n in range(n_nodes):
        for g in range(per_node):
            resident = draw(
                st.lists(st.sampled_from(names), min_size=full, max_size=2, unique=True)
            )
            devices.append(DeviceSnapshot(f"n{n}d{g}", f"n{n}", memory, tuple(resident)))
    instances = {}
    for model in draw(st.lists(st.sampled_from(names), max_size=3)):
        node = draw(st.integers(0, n_nodes - 1))
        groups = aligned_groups([f"n{node}d{g}" for g in range(per_node)], models[model].tp)
        if groups:
            g = draw(st.sampled_from(groups))
            iid = f"{model}@{'+'.join(g)}"
            instances[iid] = InstanceSnapshot(iid, model, g, 1.0)
    host = {f"n{n}": frozenset(draw(st.sets(st.sampled_from(names)))) for n in range(n_nodes)}
    snapshot = ClusterSnapshot(0.0, models, tuple(devices), tuple(instances.values()), host)
    acc = Accounting(snapshot, CONFIG)
    if draw(st.booleans()):  # stats built before the scores move, then kept up to date
        for tp in {spec.tp for spec in models.values()}:
            acc.group_stats(tp)
            acc.empty_group(tp, 0)
    for model in names:
        for r in acc.replicas.get(model, ()):
            acc.set_score(r, draw(st.sampled_from(SCORES)))
    return acc


def _empty_first(acc: Accounting, tp: int, need: int) -> tuple[str, ...] | None:
    for g in acc.groups(tp):
        if all(not acc.on[d] and acc.free(d) >= need for d in g):
            return g
    return None


def reference_prewarm(acc, model, score, evict, dedicated, engine):
    """(group, victims) a full scan picks for a prewarm, or None."""
    need = acc.shard(model) + (CONFIG.engine_bytes if engine else 0)
    empty = _empty_first(acc, acc.models[model].tp, need)
    if empty is not None:
        return empty, []
    best = None
    for i, g in enumerate(acc.groups(acc.models[model].tp)):
        found = _prewarm_key(acc, g, model, score, evict, dedicated, engine)
        if found is None:
            continue
        if not evict:
            return g, found[1]
        if best is None or (*found[0], i) < best[0]:
            best = ((*found[0], i), g, found[1])
    return None if best is None else best[1:]


def reference_start(acc, model, exclusive):
    """(group, victims) a full scan picks for a start, or None."""
    own = sorted(
        (r.devices for r in acc.replicas.get(model, ()) if r.instance is None),
        key=lambda g: acc.position[g[0]],
    )
    keyed = [(_start_key(acc, g, model, exclusive), k, g) for k, g in enumerate(own)]
    best = min(
        (((*f[0], k), g, f[1]) for f, k, g in keyed if f is not None),
        key=lambda c: c[0],
        default=None,
    )
    if best is None or best[0][0] > -int(Tier.DEVICE):
        held = {d for r in acc.replicas.get(model, ()) for d in r.devices}
        for i, g in enumerate(acc.groups(acc.models[model].tp)):
            if held.intersection(g):
                continue
            found = _start_key(acc, g, model, exclusive)
            if found is not None and (best is None or (*found[0], len(own) + i) < best[0]):
                best = ((*found[0], len(own) + i), g, found[1])
    return None if best is None else best[1:]


def chosen(actions) -> tuple | None:
    """(group, victims as (model, devices)) of a placement's actions."""
    if not actions:
        return None
    return actions[-1].devices, [(a.model, a.devices) for a in actions[:-1]]


def victims(found) -> tuple | None:
    return None if found is None else (found[0], [(r.model, r.devices) for r in found[1]])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(acc=ledgers(), data=st.data())
def test_placement_picks_what_a_full_scan_picks(acc: Accounting, data) -> None:
    names = sorted(acc.models)
    for _ in range(data.draw(st.integers(1, 8))):
        model = data.draw(st.sampled_from(names))
        resident = [r for r in acc.replicas.get(model, ()) if not r.instance]
        if resident and data.draw(st.integers(0, 3)) == 0:  # devices may be empty again
            r = data.draw(st.sampled_from(resident))
            acc.evict(r.model, r.devices)
            continue
        if data.draw(st.booleans()):
            score = data.draw(st.sampled_from(SCORES))
            evict, dedicated, engine = (data.draw(st.booleans()) for _ in range(3))
            want = victims(reference_prewarm(acc, model, score, evict, dedicated, engine))
            tier = Tier.ENGINE if engine else Tier.DEVICE
            got = place_prewarm(acc, model, score, evict=evict, dedicated=dedicated, tier=tier)
        else:
            exclusive = data.draw(st.booleans())
            want = victims(reference_start(acc, model, exclusive))
            got = place_start(acc, model, exclusive=exclusive)
        assert chosen(got) == want


def freeable(acc: Accounting, d: str) -> int:
    """Bytes evicting every resident of ``d`` frees: their shards, and the engines of the
    families that then have no replica there."""
    family = lambda r: acc.models[r.model].family  # noqa: E731
    out = sum(acc.shard(r.model) for r in acc.on[d] if not r.instance)
    left = {family(r) for r in acc.on[d] if r.instance}
    gone = {family(r) for r in acc.on[d] if not r.instance} - left
    return out + CONFIG.engine_bytes * len(gone & set(acc.engines[d]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(acc=ledgers(), data=st.data())
def test_group_stats_bound_the_exact_figures_as_replicas_move(acc: Accounting, data) -> None:
    tps = sorted({spec.tp for spec in acc.models.values()})
    for tp in tps:
        acc.group_stats(tp)
    for _ in range(data.draw(st.integers(0, 6))):  # changes the stats must follow
        model = data.draw(st.sampled_from(sorted(acc.models)))
        if data.draw(st.booleans()):
            place_prewarm(acc, model, data.draw(st.sampled_from(SCORES)), tier=Tier.ENGINE)
        else:
            place_start(acc, model)
    for tp in tps:
        got = acc.group_stats(tp)
        for j, g in enumerate(acc.groups(tp)):
            over = acc.overlapping(g)
            residents = [r.score for r in over if not r.instance]
            rbytes = [freeable(acc, d) for d in g]
            assert got.free[j] == min(acc.free(d) for d in g)
            assert got.room[j] == min(acc.free(d) + b for d, b in zip(g, rbytes, strict=True))
            assert got.count[j] == max(len(acc.on[d]) for d in g)
            assert got.rmax[j] == max(residents, default=-float("inf"))
            assert got.rmin[j] == min(residents, default=float("inf"))
            assert got.inst[j] <= sum(1 for r in over if r.instance)
            assert got.rsum[j] <= sum(residents)
            if tp == 1:
                assert got.inst[j] == sum(1 for r in over if r.instance)
                assert got.rsum[j] == sum(residents)
