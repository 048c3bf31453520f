"""Unit behaviour of the planner, autoscaler and baselines on small hand-made clusters."""

from __future__ import annotations

from dataclasses import replace

import dask.config

from warmserve.policy.accounting import Accounting, apply
from warmserve.policy.baselines import AutoscalePolicy, SharePolicy
from warmserve.policy.config import PolicyConfig
from warmserve.policy.factory import make_policy
from warmserve.policy.state import (
    ClusterSnapshot,
    DeviceSnapshot,
    Evict,
    InstanceSnapshot,
    LendKV,
    Prewarm,
    ReclaimKV,
    Start,
    Stop,
    Tier,
)
from warmserve.registry import ModelSpec

GB = 10**9
CONFIG = PolicyConfig(window=300.0, period=1200.0, engine_bytes=2 * GB)
A = ModelSpec("a", "llama", 14 * GB)
B = ModelSpec("b", "qwen", 14 * GB)
MODELS = {"a": A, "b": B}


def devices(n: int, memory: int = 80 * GB) -> tuple[DeviceSnapshot, ...]:
    return tuple(DeviceSnapshot(f"n0/d{i}", "n0", memory) for i in range(n))


def test_planner_prewarms_to_the_engine_tier_and_charges_the_engine() -> None:
    policy = make_policy("warmserve", MODELS, CONFIG)
    for w in range(8):
        policy.observe("a", w, 20.0, 60.0)  # a burst model: two replicas wanted at the peak
    snap = ClusterSnapshot(8 * CONFIG.window, MODELS, devices(2))
    actions = policy.plan(snap)
    warm = [a for a in actions if isinstance(a, Prewarm)]
    assert warm and all(a.tier == Tier.ENGINE for a in warm)
    after = apply(snap, actions, CONFIG)
    dev = after.device(warm[0].devices[0])
    assert "llama" in dev.engines and after.tier("a", dev.id) == Tier.ENGINE
    # 14 GB of weights + 2 GB of engine leave 64 GB: a 64 GB model fits beside, 65 does not.
    for size, fits in ((64, True), (65, False)):
        big = {**MODELS, "c": ModelSpec("c", "other", size * GB)}
        snap_c = ClusterSnapshot(0.0, big, (dev,))
        try:
            apply(snap_c, [Prewarm("c", (dev.id,))], CONFIG)
            assert fits
        except ValueError:
            assert not fits


def test_on_demand_takes_lent_kv_back_before_starting_another_instance() -> None:
    policy = make_policy("warmserve", MODELS, CONFIG)
    inst = InstanceSnapshot("a@n0/d0", "a", ("n0/d0",), load=10.0)
    snap = ClusterSnapshot(0.0, MODELS, devices(2), (inst,), load={"a": 10.0})
    lent = apply(snap, [LendKV("n0/d0", 5 * GB), Prewarm("b", ("n0/d0",))], CONFIG)
    waiting = ClusterSnapshot(1.0, MODELS, lent.devices, lent.instances, queued={"a": 3})
    actions = policy.on_demand(waiting, "a")
    assert ReclaimKV("n0/d0", 5 * GB) in actions
    assert not any(isinstance(a, Start) for a in actions)  # 22 free slots hold 3 waiting
    apply(waiting, actions, CONFIG)


def test_on_demand_leaves_the_loans_of_an_instance_full_by_count() -> None:
    """At ``instance_capacity`` requests an instance admits none whatever its KV space, so
    taking its loan back only evicts the weights prewarmed there."""
    policy = make_policy("warmserve", MODELS, CONFIG)
    cap = CONFIG.instance_capacity
    inst = InstanceSnapshot("a@n0/d0", "a", ("n0/d0",), load=10.0)
    snap = ClusterSnapshot(0.0, MODELS, devices(2), (inst,), load={"a": 10.0})
    lent = apply(snap, [LendKV("n0/d0", 5 * GB), Prewarm("b", ("n0/d0",))], CONFIG)
    full = replace(lent.instances[0], load=float(cap))
    waiting = ClusterSnapshot(1.0, MODELS, lent.devices, (full,), queued={"a": 3})
    actions = policy.on_demand(waiting, "a")
    assert not any(isinstance(a, (ReclaimKV, Evict)) for a in actions)
    assert Start("a", ("n0/d1",)) in actions  # a new instance, on the other device
    apply(waiting, actions, CONFIG)


def test_on_demand_stops_an_idle_instance_when_every_device_serves() -> None:
    policy = make_policy("warmserve", MODELS, CONFIG)
    insts = (
        InstanceSnapshot("b@n0/d0", "b", ("n0/d0",), load=0.0),
        InstanceSnapshot("a@n0/d1", "a", ("n0/d1",), load=32.0),
    )
    snap = ClusterSnapshot(10.0, MODELS, devices(2), insts, queued={"a": 5})
    actions = policy.on_demand(snap, "a")
    assert actions[0] == Stop("b@n0/d0") and actions[-1] == Start("a", ("n0/d0",))
    apply(snap, actions, CONFIG)


def test_on_demand_never_stops_an_instance_still_starting() -> None:
    """An instance being started serves nothing yet, but stopping it for another model's queue
    wastes its activation: two models with queues stopped each other's starts every demand
    interval on a full cluster, neither ever serving. Still starting: ready later (the
    simulator) or at the snapshot's time (the scheduler plugin)."""
    a_full = InstanceSnapshot("a@n0/d1", "a", ("n0/d1",), load=32.0)
    for started in (12.0, 10.0):
        b = InstanceSnapshot("b@n0/d0", "b", ("n0/d0",), load=0.0, started=started)
        snap = ClusterSnapshot(10.0, MODELS, devices(2), (b, a_full), queued={"a": 5})
        assert make_policy("warmserve", MODELS, CONFIG).on_demand(snap, "a") == []


def test_on_demand_moves_busy_instances_off_a_group_a_wider_model_needs() -> None:
    """Two devices serve nothing, but one in each TP-2 group: the TP-2 model's queue would wait
    for as long as the busy instances stay (a 70B burst waited ten minutes with seven of 16
    GPUs free). One instance moves to the free device of the other group, the model starts on
    the group it leaves. Instances of models with requests waiting, or that have just started,
    stay where they are."""
    models = {**MODELS, "c": ModelSpec("c", "big", 26 * GB, tp=2)}

    def on_demand(queued: dict[str, int], started: float) -> list:
        insts = tuple(
            InstanceSnapshot(f"{m}@n0/d{i}", m, (f"n0/d{i}",), load=10.0, started=started)
            for m, i in (("a", 0), ("b", 2))
        )
        snap = ClusterSnapshot(100.0, models, devices(4), insts, queued=queued)
        actions = make_policy("warmserve", models, CONFIG).on_demand(snap, "c")
        apply(snap, actions, CONFIG)
        return actions

    assert on_demand({"c": 5}, 0.0) == [
        Stop("a@n0/d0"),
        Start("c", ("n0/d0", "n0/d1")),
        Start("a", ("n0/d3",)),
    ]
    assert on_demand({"c": 5, "a": 1}, 0.0)[:2] == [Stop("b@n0/d2"), Start("c", ("n0/d2", "n0/d3"))]
    assert on_demand({"c": 5}, 100.0 - CONFIG.grace / 2) == []


def test_autoscaler_sheds_below_half_capacity_after_the_grace_period() -> None:
    policy = AutoscalePolicy(MODELS, CONFIG)
    insts = tuple(
        InstanceSnapshot(f"a@n0/d{i}", "a", (f"n0/d{i}",), load=10.0, started=0.0) for i in range(3)
    )
    # 30 of 96 is under 50%, and two instances hold 30 under 80% of their 64.
    stops = []
    for t in (100.0, 102.0, 105.0):
        snap = ClusterSnapshot(t, MODELS, devices(3), insts, load={"a": 30.0})
        stops.append([a for a in policy.plan(snap) if isinstance(a, Stop)])
    assert stops[0] == [] and stops[1] == [] and len(stops[2]) == 1
    # Above 50% nothing stops however long it lasts.
    policy = AutoscalePolicy(MODELS, CONFIG)
    for t in (100.0, 110.0, 120.0):
        snap = ClusterSnapshot(t, MODELS, devices(3), insts, load={"a": 50.0})
        assert not [a for a in policy.plan(snap) if isinstance(a, Stop)]


def test_autoscale_keeps_the_last_instance_alive_while_busy_then_for_keep_alive() -> None:
    policy = AutoscalePolicy(MODELS, CONFIG)
    inst = (InstanceSnapshot("a@n0/d0", "a", ("n0/d0",), load=0.0, started=0.0),)
    snap = ClusterSnapshot(100.0, MODELS, devices(1), inst, load={"a": 3.0})
    assert policy.plan(snap) == []  # busy below 50%: the last instance has no one to hand to
    for t, stops in ((105.0, False), (105.0 + CONFIG.keep_alive - 1, False)):
        assert bool(policy.plan(ClusterSnapshot(t, MODELS, devices(1), inst))) == stops
    actions = policy.plan(ClusterSnapshot(105.0 + CONFIG.keep_alive, MODELS, devices(1), inst))
    assert actions == [Stop("a@n0/d0"), Evict("a", ("n0/d0",))]


def test_autoscaler_counts_each_waiting_request_once() -> None:
    """The load counts queued requests from their arrival: one request waiting for a model with
    no instance starts one instance at capacity 2 (load + queued made it two), and a full
    instance of 32 with 10 waiting gets one more (ceil(42 / 25.6) = 2 in all), not two more."""
    small = replace(CONFIG, instance_capacity=2)
    one = AutoscalePolicy(MODELS, small).plan(
        ClusterSnapshot(0.0, MODELS, devices(3), load={"a": 1.0}, queued={"a": 1})
    )
    assert one == [Start("a", ("n0/d0",))]
    # Queued requests the load has not caught up with (no window yet) still scale from zero.
    alone = AutoscalePolicy(MODELS, small).plan(
        ClusterSnapshot(0.0, MODELS, devices(3), queued={"a": 1})
    )
    assert alone == [Start("a", ("n0/d0",))]
    full = (InstanceSnapshot("a@n0/d0", "a", ("n0/d0",), load=32.0),)
    snap = ClusterSnapshot(0.0, MODELS, devices(3), full, load={"a": 42.0}, queued={"a": 10})
    starts = [a for a in AutoscalePolicy(MODELS, CONFIG).plan(snap) if isinstance(a, Start)]
    assert len(starts) == 1


def test_share_layout_is_made_again_when_devices_join() -> None:
    policy = SharePolicy(MODELS, CONFIG)
    assert policy.plan(ClusterSnapshot(0.0, MODELS, ())) == []  # no worker yet
    snap = ClusterSnapshot(5.0, MODELS, devices(1))
    first = policy.plan(snap)
    assert sorted(a.model for a in first) == ["a", "b"]  # two parts of one device
    snap = apply(snap, first, CONFIG)
    grown = ClusterSnapshot(10.0, MODELS, devices(2), snap.instances)
    more = policy.plan(grown)
    assert more and all(a.devices == ("n0/d1",) for a in more)  # the old ones stay in place
    assert policy.plan(apply(grown, more, CONFIG)) == []


def test_simulate_reads_the_forecast_section_of_dask_config() -> None:
    from warmserve.sim.policies import live_config

    assert live_config().window == 300.0
    with dask.config.set({"warmserve.forecast.window": 600, "warmserve.autoscaler.grace": 7}):
        cfg = live_config()
    assert cfg.window == 600.0 and cfg.grace == 7.0


def test_a_served_model_reported_resident_is_one_replica() -> None:
    """Workers keep the pool copy of a model they serve and report it resident; the ledger
    counts the instance alone, so stopping it leaves one idle replica, not two, and an
    on-demand start that stops it still finds the device (live, a duplicate here left a ghost
    replica in the cached ledger, and the start never came: only the stop, every request)."""
    policy = make_policy("warmserve", MODELS, CONFIG)
    devs = devices(1)
    served = (replace(devs[0], resident=("b", "a")),)
    snap = ClusterSnapshot(
        10.0, MODELS, served, (InstanceSnapshot("b@n0/d0", "b", ("n0/d0",), 0.0),), queued={"a": 1}
    )
    acc = Accounting(snap, CONFIG)
    assert len(acc.replicas["b"]) == 1 and acc.replicas["b"][0].instance
    for _ in range(2):  # the second call runs on the cached ledger, synced to the same snapshot
        actions = policy.on_demand(snap, "a")
        assert actions == [Stop("b@n0/d0"), Start("a", ("n0/d0",))], actions
    after = ClusterSnapshot(11.0, MODELS, served, (), queued={"a": 1})
    assert policy.on_demand(after, "a") == [Start("a", ("n0/d0",))]
    assert len(policy._ledgers.ledger(after).replicas["b"]) == 1


def test_a_rarely_used_model_does_not_displace_a_busy_one() -> None:
    """Scores weigh how likely a model is asked for at all: a large model that sees a request
    now and then (a peak of one in flight, a tiny average) used to outscore, by its cold-start
    cost and the burst weight, a smaller model kept busy, and its prewarm evicted the busy
    model's weights where there was room for one (the memory-scarce ablation's host starts).
    A burst forecast for a model with no average load still counts in full."""
    big = ModelSpec("big", "other", 26 * GB)
    models = {"a": A, "big": big}
    one = (replace(devices(1, 40 * GB)[0], resident=("a",), engines=("llama",)),)
    for name, avg, peak, displaced in (("rare", 0.02, 1.0, False), ("burst", 0.0, 40.0, True)):
        policy = make_policy("warmserve", models, CONFIG)
        for w in range(8):
            policy.observe("a", w, 2.0, 5.0)
            policy.observe("big", w, avg, peak)
        actions = policy.plan(ClusterSnapshot(8 * CONFIG.window, models, one))
        assert (Evict("a", ("n0/d0",)) in actions) == displaced, (name, actions)
        assert any(isinstance(a, Prewarm) and a.model == "big" for a in actions) == displaced
