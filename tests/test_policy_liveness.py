"""Liveness (issue 22, item 4): prewarming never starves a request.

Over random small clusters (device sizes, models of mixed sizes at TP 1 and 2, prewarmed
residents, idle, busy and starting instances, KV lent to weights prewarmed beside them),
whenever a request waits for a model that fits a TP group held only by prewarmed weights and
idle instances, the policy's next planning tick and its on-demand answer each start an instance
of it. The premise is checked from the snapshot with the capacity rule alone, not through the
placement code under test.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmserve.policy.accounting import Accounting, InfeasibleAction, aligned_groups
from warmserve.policy.config import PolicyConfig
from warmserve.policy.factory import make_policy
from warmserve.policy.state import (
    ClusterSnapshot,
    DeviceSnapshot,
    InstanceSnapshot,
    LendKV,
    Prewarm,
    Start,
    Tier,
)
from warmserve.registry import ModelSpec

GB = 10**9
CONFIG = PolicyConfig(window=300.0, period=1200.0, engine_bytes=2 * GB)
NOW = 1000.0
POLICIES = ("warmserve", "warmserve-noprewarm", "warmserve-noplacement", "warmserve-nolend")


@st.composite
def cases(draw):
    """A snapshot and a model with requests waiting and no instance with room for them."""
    per_node = draw(st.sampled_from([1, 2, 4]))
    devices = []
    for n in range(draw(st.integers(1, 2))):
        sizes = draw(st.lists(st.sampled_from([24, 32, 40, 48, 80]), min_size=1, max_size=2))
        for g in range(per_node):
            devices.append(DeviceSnapshot(f"n{n}d{g}", f"n{n}", sizes[g % len(sizes)] * GB))
    models = {}
    kv_bytes = {}
    for i in range(draw(st.integers(2, 6))):
        tp = draw(st.sampled_from([t for t in (1, 2) if t <= per_node]))
        nbytes = draw(st.sampled_from([3, 7, 14, 20, 26, 40, 60])) * GB
        family = draw(st.sampled_from(["llama", "qwen", "mistral"]))
        models[f"m{i}"] = ModelSpec(f"m{i}", family, nbytes, tp)
        if draw(st.booleans()):  # KV per request as the simulator's cost model gives it
            kv_bytes[f"m{i}"] = nbytes // draw(st.sampled_from([10, 20, 40]))
    config = replace(CONFIG, kv_bytes=kv_bytes)
    names = sorted(models)
    acc = Accounting(ClusterSnapshot(NOW, models, tuple(devices)), config)
    loads: dict[str, tuple[float, float]] = {}  # instance -> (load, started)
    # Instances first, then loans of their KV and weights prewarmed in it: a policy never
    # starts an instance in lent space (a lent device is dedicated, and starts are exclusive).
    steps = draw(st.lists(st.sampled_from(["prewarm", "start", "lend"]), max_size=12))
    for action in sorted(steps, key=lambda a: a != "start"):
        model = draw(st.sampled_from(names))
        groups = acc.groups(models[model].tp)
        if not groups:
            continue
        group = draw(st.sampled_from(groups))
        try:
            if action == "lend":  # KV an instance lends to weights prewarmed beside it
                device = draw(st.sampled_from(acc.order))
                acc.enact(LendKV(device, acc.kv[device] // draw(st.sampled_from([1, 2, 4]))))
            elif action == "prewarm":
                tier = draw(st.sampled_from([Tier.DEVICE, Tier.ENGINE]))
                acc.enact(Prewarm(model, group, tier))
            else:
                iid = acc.start(model, group)
                kind = draw(st.sampled_from(["idle", "busy", "starting"]))
                cap = acc.capacity(model, group)
                load = {"idle": 0.0, "busy": float(draw(st.integers(1, cap))), "starting": 0.0}
                started = NOW + 3.0 if kind == "starting" else NOW - 60.0
                loads[iid] = (load[kind], started)
        except InfeasibleAction:
            continue
    snap = acc.snapshot()
    wanted = draw(st.sampled_from(names))
    instances = []
    for i in snap.instances:
        load, started = loads[i.id]
        if i.model == wanted:  # its instances are full: the request waits for a new one
            load, started = float(acc.capacity(i.model, i.devices)), NOW - 60.0
        instances.append(InstanceSnapshot(i.id, i.model, i.devices, load, started))
    queued = draw(st.integers(1, 40))
    load = {wanted: queued + sum(i.load for i in instances if i.model == wanted)}
    snapshot = ClusterSnapshot(
        NOW, models, snap.devices, tuple(instances), snap.host_cache, load, {wanted: queued}
    )
    history = draw(st.lists(st.tuples(st.sampled_from(names), st.floats(0, 80)), max_size=12))
    return snapshot, wanted, history, config


def only_prewarmed_or_idle_in_the_way(
    snapshot: ClusterSnapshot, model: str, config: PolicyConfig
) -> bool:
    """Whether some TP group of ``model`` would hold an instance of it (one request's KV at
    least) once its prewarmed weights were evicted and its idle instances stopped: no busy or
    starting instance, nor one of ``model`` itself, on any of its devices."""
    spec = snapshot.models[model]
    memory = {d.id: d.memory for d in snapshot.devices}
    nodes: dict[str, list[str]] = {}
    for d in snapshot.devices:
        nodes.setdefault(d.node, []).append(d.id)
    blocked = {
        d
        for i in snapshot.instances
        if i.model == model or i.load > 0 or i.started >= snapshot.time
        for d in i.devices
    }
    return any(
        not blocked.intersection(g) and config.capacity(spec, min(memory[d] for d in g)) >= 1
        for devs in nodes.values()
        for g in aligned_groups(devs, spec.tp)
    )


def starts(actions, model: str) -> list[Start]:
    return [a for a in actions if isinstance(a, Start) and a.model == model]


def policy_for(name: str, snapshot: ClusterSnapshot, history, config: PolicyConfig):
    policy = make_policy(name, snapshot.models, config)
    for w, (model, level) in enumerate(history):  # forecasts that want replicas prewarmed
        for m in snapshot.models:
            policy.observe(m, w, level if m == model else level / 4, level * 2)
    return policy


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), name=st.sampled_from(POLICIES))
def test_a_waiting_request_gets_a_start_at_the_next_tick(case, name) -> None:
    snapshot, model, history, config = case
    if not only_prewarmed_or_idle_in_the_way(snapshot, model, config):
        return
    tick = policy_for(name, snapshot, history, config).plan(snapshot)
    assert starts(tick, model), (model, tick)
    demand = policy_for(name, snapshot, history, config).on_demand(snapshot, model)
    assert starts(demand, model), (model, demand)


def test_prewarmed_weights_of_another_family_give_way_on_a_device_they_fill() -> None:
    """A 32 GB device with a 14 GB model of another family prewarmed beside its engine: the
    waiting model's KV (716 MB a request, a 7B model's in the simulator's cost model) fills
    what the device has beside its weights and engine, 22 requests' worth, and only evicting
    the resident and its engine makes that room (counting the weights alone, the start never
    found it)."""
    models = {"a": ModelSpec("a", "llama", 14 * GB), "b": ModelSpec("b", "qwen", 14 * GB)}
    config = replace(CONFIG, kv_bytes={"a": 716 * 10**6, "b": 716 * 10**6})
    assert config.capacity(models["a"], 32 * GB) == 22
    device = DeviceSnapshot("n0d0", "n0", 32 * GB, ("b",), ("qwen",))
    snapshot = ClusterSnapshot(NOW, models, (device,), load={"a": 1.0}, queued={"a": 1})
    for name in POLICIES:
        assert starts(make_policy(name, models, config).plan(snapshot), "a")
        assert starts(make_policy(name, models, config).on_demand(snapshot, "a"), "a")
