"""Properties every policy's actions keep when enacted on a snapshot, for random clusters.

The invariants are checked from the snapshots and action lists directly (not through the
ledger the policies use), so a bug in :class:`Accounting` cannot hide itself.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmserve.policy.accounting import Accounting, InfeasibleAction, LedgerCache, apply
from warmserve.policy.config import PolicyConfig
from warmserve.policy.factory import POLICIES, make_policy
from warmserve.policy.state import (
    ClusterSnapshot,
    DeviceSnapshot,
    Evict,
    InstanceSnapshot,
    Prewarm,
    Start,
    Stop,
    Tier,
)
from warmserve.registry import ModelSpec

GB = 10**9
# 4 windows per period: seasons show quickly; engines take memory, so the ledger must charge it.
CONFIG = PolicyConfig(window=300.0, period=1200.0, engine_bytes=GB)


@st.composite
def clusters(draw):
    n_nodes = draw(st.integers(1, 3))
    per_node = draw(st.sampled_from([1, 2, 4, 8]))
    memory = draw(st.sampled_from([24, 40, 80])) * GB
    devices = tuple(
        DeviceSnapshot(f"n{n}d{g}", f"n{n}", memory)
        for n in range(n_nodes)
        for g in range(per_node)
    )
    n_models = draw(st.integers(1, 8))
    models = {}
    for i in range(n_models):
        tp = draw(st.sampled_from([t for t in (1, 2, 4) if t <= per_node]))
        nbytes = draw(st.integers(1, 40)) * GB
        family = draw(st.sampled_from(["llama", "qwen"]))
        models[f"m{i}"] = ModelSpec(f"m{i}", family, nbytes, tp)
    history = draw(
        st.lists(
            st.tuples(st.integers(0, n_models - 1), st.floats(0, 200), st.floats(0, 3)),
            max_size=30,
        )
    )
    ticks = draw(
        st.lists(
            st.tuples(
                st.dictionaries(st.integers(0, n_models - 1), st.floats(0, 150), max_size=4),
                st.integers(0, n_models - 1),
            ),
            min_size=1,
            max_size=5,
        )
    )
    return ClusterSnapshot(0.0, models, devices), history, ticks


def feed(policy, snapshot: ClusterSnapshot, history) -> None:
    names = list(snapshot.models)
    for w, (i, avg, burst) in enumerate(history):
        for j, m in enumerate(names):
            level = avg if j == i else avg / (j + 2)
            policy.observe(m, w, level, level * (1 + burst))


def check(snapshot: ClusterSnapshot, groups: dict) -> None:
    """Memory, duplicates, TP groups and nesting, from the snapshot and the tracked groups."""
    cfg = CONFIG
    specs = snapshot.models
    node = {d.id: d.node for d in snapshot.devices}
    memory = {d.id: d.memory for d in snapshot.devices}
    for d in snapshot.devices:
        used = sum(math.ceil(specs[m].nbytes / specs[m].tp) for m in d.resident)
        used += cfg.engine_bytes * len(d.engines)
        assert len(set(d.engines)) == len(d.engines), d
        on_device = list(d.resident)
        kv = 0
        for inst in snapshot.instances:
            if d.id in inst.devices:
                spec = specs[inst.model]
                group = min(memory[x] for x in inst.devices)
                assert cfg.capacity(spec, group) >= 1, inst
                kv += math.ceil(cfg.kv_reservation(spec, group) / spec.tp)
                used += math.ceil(spec.nbytes / spec.tp)
                on_device.append(inst.model)
        assert 0 <= d.lent <= kv
        assert used + kv - d.lent <= d.memory, d
        assert len(on_device) == len(set(on_device)), d
    for inst in snapshot.instances:
        assert len(inst.devices) == specs[inst.model].tp
        assert len({node[x] for x in inst.devices}) == 1
    live = list(groups.values())
    for a in live:
        for b in live:
            if a is not b and set(a) & set(b):
                assert set(a) <= set(b) or set(b) <= set(a), (a, b)


def track(groups: dict, actions) -> None:
    """Follow the device groups of replicas through a list of actions."""
    for a in actions:
        match a:
            case Prewarm(model, devices, tier) if tier >= Tier.DEVICE:
                groups[(model, frozenset(devices))] = tuple(devices)
            case Evict(model, devices):
                del groups[(model, frozenset(devices))]
            case Start(model, devices):
                groups[(model, frozenset(devices))] = tuple(devices)
            case Stop():
                pass  # the weights stay where the instance was


def same_ledger(a: Accounting, b: Accounting) -> None:
    """Two ledgers hold the same cluster (replica lists per model in any order)."""
    assert (a.used, a.kv, a.lent, a.memory) == (b.used, b.kv, b.lent, b.memory)
    assert {d: sorted(e) for d, e in a.engines.items()} == {
        d: sorted(e) for d, e in b.engines.items()
    }
    assert a.host == b.host
    key = lambda r: (r.model, r.devices, r.instance, r.load, r.started)  # noqa: E731
    assert {d: [key(r) for r in rs] for d, rs in a.on.items()} == {
        d: [key(r) for r in rs] for d, rs in b.on.items()
    }
    assert sorted(a.instances) == sorted(b.instances)
    assert {m: sorted(map(key, rs)) for m, rs in a.replicas.items() if rs} == {
        m: sorted(map(key, rs)) for m, rs in b.replicas.items() if rs
    }
    ia, ib = a.device_index(), b.device_index()
    for f in ("free", "count", "inst", "rbytes"):
        assert (getattr(ia, f) == getattr(ib, f)).all(), f


def run(name: str, snapshot: ClusterSnapshot, history, ticks, cache: LedgerCache | None = None):
    """Plan and serve demand tick by tick; return every action list and the last snapshot.
    With ``cache``, also check that its ledger follows each snapshot as a fresh one would."""
    policy = make_policy(name, snapshot.models, CONFIG)
    feed(policy, snapshot, history)
    names = list(snapshot.models)
    t0 = len(history) * CONFIG.window
    log = []
    groups: dict = {}
    for k, (loads, wanted) in enumerate(ticks):
        snapshot = ClusterSnapshot(
            t0 + k * CONFIG.tick * 3,
            snapshot.models,
            snapshot.devices,
            tuple(
                InstanceSnapshot(
                    i.id, i.model, i.devices, loads.get(names.index(i.model), 0.0), i.started
                )
                for i in snapshot.instances
            ),
            snapshot.host_cache,
            {names[i]: v for i, v in loads.items()},
        )
        for actions in (policy.plan(snapshot), None):
            if actions is None:
                actions = policy.on_demand(snapshot, names[wanted])
            log.append(actions)
            if cache is not None:  # record the actions in the cached ledger, as a policy does
                acc = cache.ledger(snapshot)
                for a in actions:
                    acc.enact(a)
            snapshot = apply(snapshot, actions, CONFIG)
            if cache is not None:
                same_ledger(cache.ledger(snapshot), Accounting(snapshot, CONFIG))
            track(groups, actions)
            check(snapshot, groups)
    return log, snapshot


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=clusters())
def test_actions_keep_invariants_and_are_deterministic(name: str, case) -> None:
    snapshot, history, ticks = case
    log, _ = run(name, snapshot, history, ticks)
    again, _ = run(name, snapshot, history, ticks)
    assert log == again


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=clusters())
def test_cached_ledger_follows_snapshots_like_a_fresh_one(case) -> None:
    snapshot, history, ticks = case
    run("warmserve", snapshot, history, ticks, LedgerCache(CONFIG))


def test_apply_rejects_overcommit_and_duplicates() -> None:
    spec = ModelSpec("a", "llama", 30 * GB)
    snap = ClusterSnapshot(
        0.0,
        {"a": spec, "b": ModelSpec("b", "llama", 30 * GB)},
        (DeviceSnapshot("d", "n", 50 * GB),),
    )
    after = apply(snap, [Prewarm("a", ("d",))], CONFIG)
    assert after.device("d").resident == ("a",)
    with pytest.raises(InfeasibleAction):
        apply(after, [Prewarm("b", ("d",))], CONFIG)  # 60 GB on a 50 GB device
    with pytest.raises(InfeasibleAction):
        apply(after, [Prewarm("a", ("d",))], CONFIG)  # a second copy on one device
    swapped = apply(after, [Evict("a", ("d",)), Prewarm("b", ("d",))], CONFIG)
    assert swapped.device("d").resident == ("b",)


def test_on_demand_prefers_the_warmest_group_and_evicts_explicitly() -> None:
    models = {m: ModelSpec(m, "llama", 30 * GB) for m in ("a", "b")}
    devices = (DeviceSnapshot("d0", "n0", 80 * GB), DeviceSnapshot("d1", "n0", 80 * GB, ("a",)))
    full = ClusterSnapshot(0.0, models, devices)
    policy = make_policy("warmserve", models, CONFIG)
    assert policy.on_demand(full, "a") == [Start("a", ("d1",))]
    crowded = ClusterSnapshot(
        0.0,
        models,
        (DeviceSnapshot("d0", "n0", 50 * GB, ("b",)), DeviceSnapshot("d1", "n1", 50 * GB, ("a",))),
    )
    # b is resident on d0 but needs its KV too: 30 + 15 fits 50, so b starts in place.
    assert policy.on_demand(crowded, "b") == [Start("b", ("d0",))]
    # a third model must evict a resident first, and says so.
    models3 = {**models, "c": ModelSpec("c", "qwen", 30 * GB)}
    crowded3 = ClusterSnapshot(0.0, models3, crowded.devices)
    actions = make_policy("warmserve", models3, CONFIG).on_demand(crowded3, "c")
    assert isinstance(actions[0], Evict) and actions[-1].model == "c"


def test_tp_replicas_stay_on_one_node_and_evictions_credit_every_shard() -> None:
    models = {
        "big": ModelSpec("big", "llama", 60 * GB, tp=2),
        "s": ModelSpec("s", "llama", 20 * GB),
    }
    devices = tuple(
        DeviceSnapshot(f"n{n}d{g}", f"n{n}", 40 * GB) for n in range(2) for g in range(2)
    )
    snap = ClusterSnapshot(0.0, models, devices)
    after = apply(snap, [Prewarm("big", ("n1d0", "n1d1"))], CONFIG)
    with pytest.raises(InfeasibleAction):
        apply(snap, [Prewarm("big", ("n0d1", "n1d0"))], CONFIG)
    back = apply(after, [Evict("big", ("n1d0", "n1d1")), Prewarm("s", ("n1d0",))], CONFIG)
    assert back.device("n1d1").resident == ()
    assert back.device("n1d0").resident == ("s",)
