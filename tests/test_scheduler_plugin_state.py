"""The scheduler plugin's accounting: routing rules and what the policy is shown."""

from __future__ import annotations

import asyncio

import pytest

from warmserve.policy.config import PolicyConfig
from warmserve.policy.state import DeviceMode, DeviceSnapshot
from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin.extension import parse_report
from warmserve.scheduler_plugin.state import START_ATTEMPTS, ClusterState, Instance, Starting

MODELS = Registry([ModelSpec("a", "f", 100), ModelSpec("b", "f", 100)])


@pytest.fixture
def state() -> ClusterState:
    s = ClusterState(MODELS, PolicyConfig(instance_capacity=2))
    for w, dev in (("tcp://w0", "n/cpu:0"), ("tcp://w1", "n/cpu:1")):
        s.update_worker(w, [DeviceSnapshot(dev, "n", 1000)], [], [], now=0.0)
    s.update_worker(
        "tcp://w0", s.workers["tcp://w0"].devices.values(), [("i0", "a", ("n/cpu:0",))], [], 1.0
    )
    s.update_worker(
        "tcp://w1", s.workers["tcp://w1"].devices.values(), [("i1", "a", ("n/cpu:1",))], [], 1.0
    )
    return s


def route(s: ClusterState, rid: str, model: str = "a", exclude=()) -> str | None:
    s.arrive(rid, model)
    inst = s.pick(model, exclude)
    if inst is not None:
        s.assign(rid, inst)
    return inst.id if inst else None


def test_least_loaded_with_room_then_full(state):
    assert [route(state, f"r{k}") for k in range(4)] == ["i0", "i1", "i0", "i1"]
    assert route(state, "r4") is None
    assert state.waiting() == {"a": 1}
    state.finish("r1")
    assert route(state, "r5") == "i1"


def test_retry_releases_the_old_slot_and_skips_the_failed_instance(state):
    assert route(state, "r0") == "i0"
    assert state.arrive("r0", "a") is False  # same request again: not a new arrival
    assert state.instances["i0"].load == 0
    assert state.pick("a", exclude=["i0"]).id == "i1"


def test_draining_instance_takes_no_requests(state):
    state.instances["i0"].draining = True
    assert route(state, "r0") == "i1"
    assert "i0" not in {i.id for i in state.snapshot(0.0, {}).instances}


def test_lost_worker_turns_its_requests_back_into_waiting(state):
    route(state, "r0")
    assert state.remove_worker("tcp://w0") == ["i0"]
    assert state.waiting() == {"a": 1}
    assert [d.id for d in state.snapshot(0.0, {}).devices] == ["n/cpu:1"]


def test_report_replaces_instances_but_keeps_loads(state):
    route(state, "r0")
    devs = state.workers["tcp://w0"].devices.values()
    state.update_worker("tcp://w0", devs, [("i0", "a", ("n/cpu:0",))], ["b"], 2.0)
    assert state.instances["i0"].load == 1
    assert state.snapshot(0.0, {}).host_cache == {"n": frozenset({"b"})}
    state.update_worker("tcp://w0", devs, [], [], 3.0)
    assert "i0" not in state.instances and state.waiting() == {"a": 1}


def test_a_start_under_way_counts_as_dedicating_its_device():
    async def main():
        s = ClusterState(MODELS, PolicyConfig(instance_capacity=2))
        s.update_worker(
            "tcp://w", [DeviceSnapshot("n/cpu:0", "n", 1000, resident=("b",))], [], [], 0
        )
        assert s.snapshot(0.0, {}).mode("n/cpu:0") is DeviceMode.UNIVERSAL
        s.starting.append(Starting("a", ("n/cpu:0",), "tcp://w"))
        snap = s.snapshot(0.0, {})
        assert snap.mode("n/cpu:0") is DeviceMode.DEDICATED
        assert s.starting_with_room("a") is s.starting[0] and s.starting_with_room("b") is None

    asyncio.run(main())


def test_starts_failing_in_a_row_make_a_model_unstartable_until_one_succeeds():
    async def main():
        s = ClusterState(MODELS, PolicyConfig(instance_capacity=2))
        for attempt in range(1, START_ATTEMPTS + 1):
            assert s.start_failing("a") is None
            starting = Starting("a", ("n/cpu:0",), "tcp://w")
            s.starting.append(starting)
            s.end_start(starting, None, "EngineDied" if attempt % 2 else "OSError")
            assert starting.ready.result() is None
        reason = s.start_failing("a")
        assert reason is not None and f"{START_ATTEMPTS} times" in reason and "EngineDied" in reason
        left = Starting("a", ("n/cpu:0",), "tcp://w")
        s.end_start(left, None)  # its worker left: not a failure of the model
        assert f"{START_ATTEMPTS} times" in s.start_failing("a")
        assert s.start_failing("b") is None
        ok = Starting("a", ("n/cpu:0",), "tcp://w")
        s.end_start(ok, Instance("i", "a", ("n/cpu:0",), "tcp://w", started=0.0))
        assert s.start_failing("a") is None

    asyncio.run(main())


def test_parse_report():
    devices, instances, host = parse_report(
        {
            "devices": [{"id": "n/cpu:0", "node": "n", "memory": 5, "resident": ["a"]}],
            "instances": [{"id": "i", "model": "a", "device": "n/cpu:0"}],
            "host_cache": ["b"],
        }
    )
    assert devices[0].resident == ("a",) and instances == [("i", "a", ("n/cpu:0",))]
    assert host == ["b"]


def test_lent_kv_is_kept_by_the_scheduler_until_reclaimed(state):
    state.lend("n/cpu:0", 300)
    assert state.snapshot(0.0, {}).device("n/cpu:0").lent == 300
    devs = state.workers["tcp://w0"].devices.values()
    state.update_worker("tcp://w0", devs, [("i0", "a", ("n/cpu:0",))], [], 2.0)  # reports 0
    assert state.snapshot(0.0, {}).device("n/cpu:0").lent == 300
    state.lend("n/cpu:0", -300)
    assert state.snapshot(0.0, {}).device("n/cpu:0").lent == 0


def test_a_request_waiting_on_a_start_is_that_start_s_load_not_queued():
    """A reservation on a start under way shows as the starting instance's load; counting the
    request as waiting too made the planner start another instance for it."""

    async def main():
        s = ClusterState(MODELS, PolicyConfig(instance_capacity=2))
        s.update_worker("tcp://w", [DeviceSnapshot("n/cpu:0", "n", 1000)], [], [], 0)
        starting = Starting("a", ("n/cpu:0",), "tcp://w")
        s.starting.append(starting)
        for rid in ("r0", "r1"):
            s.arrive(rid, "a")
        starting.reserved += 1  # r0 waits for the start; r1 has no slot anywhere
        snap = s.snapshot(0.0, {"a": 2.0})
        assert snap.queued == {"a": 1}
        assert [i.load for i in snap.instances] == [1.0]
        starting.reserved += 1
        assert s.waiting() == {}

    asyncio.run(main())


def test_a_draining_instance_holds_its_devices_until_it_is_gone(state):
    """A start on the devices of a stopped instance still finishing requests waits for it."""
    assert route(state, "r0") == "i0"
    assert not state.draining_on(("n/cpu:0",))
    state.instances["i0"].draining = True
    assert state.draining_on(("n/cpu:0", "n/cpu:9")) and not state.draining_on(("n/cpu:1",))
    state.finish("r0")
    del state.instances["i0"]  # what deactivating it does
    assert not state.draining_on(("n/cpu:0",))
