"""Leases of instance slots to a front door: the scheduler's accounting keeps capacity exact
whatever order the batched reports arrive in, and the front door's side reports every request."""

from __future__ import annotations

import asyncio

import pytest

from warmserve.frontdoor.leases import Leases
from warmserve.policy.config import PolicyConfig
from warmserve.policy.state import DeviceSnapshot
from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin.state import ClusterState

MODELS = Registry([ModelSpec("a", "f", 100)])
CAPACITY = 4


@pytest.fixture
def state() -> ClusterState:
    s = ClusterState(MODELS, PolicyConfig(instance_capacity=CAPACITY))
    s.update_worker("tcp://w0", [DeviceSnapshot("n/cpu:0", "n", 1000)], [], [], now=0.0)
    s.update_worker(
        "tcp://w0",
        s.workers["tcp://w0"].devices.values(),
        [("i0", "a", ("n/cpu:0",))],
        [],
        1.0,
    )
    return s


def leased_arrival(s: ClusterState, rid: str, holder: str = "fd") -> None:
    s.arrive(rid, "a")
    s.assign(rid, s.instances["i0"], holder)


def test_a_lease_takes_capacity_but_is_no_load(state):
    inst = state.instances["i0"]
    state.arrive("r0", "a")
    assert state.grant("fd", inst, 8) == CAPACITY  # no more than there is
    state.assign("r0", inst, "fd")
    assert (inst.load, state.free(inst)) == (1, 0)
    assert state.pick("a") is None  # another front door finds it full
    assert state.snapshot(0.0, {}).instances[0].load == 1.0  # the planner sees one request


def test_completion_reported_after_the_next_arrival_keeps_capacity(state):
    """The front door reuses a freed slot before its done reaches the scheduler."""
    inst = state.instances["i0"]
    state.grant("fd", inst, CAPACITY)
    for k in range(CAPACITY):
        leased_arrival(state, f"r{k}")
    leased_arrival(state, "late")  # took r0's slot, reported first
    assert state.free(inst) == 0
    state.finish("r0")
    for k in range(1, CAPACITY):
        state.finish(f"r{k}")
    state.finish("late")
    assert (inst.load, inst.on_lease, state.free(inst)) == (0, 0, 0)  # all leased, all free
    state.end_lease("fd", "i0")
    assert state.free(inst) == CAPACITY


def test_ending_a_lease_keeps_its_running_requests(state):
    inst = state.instances["i0"]
    state.grant("fd", inst, 3)
    leased_arrival(state, "r0")
    state.revoke("i0")  # a Stop: the lease ends, the request runs on
    assert (inst.load, inst.leased, state.free(inst)) == (1, 0, CAPACITY - 1)
    leased_arrival(state, "r1")  # reported after the revocation: a plain slot
    state.finish("r0")
    state.finish("r1")
    assert (inst.load, inst.on_lease, state.free(inst)) == (0, 0, CAPACITY)
    assert state.summary()["leases"] == {}


def test_a_front_door_that_leaves_frees_its_leases(state):
    inst = state.instances["i0"]
    state.grant("fd", inst, 2)
    state.drop_holder("fd")
    assert state.free(inst) == CAPACITY and "fd" not in state.leases


def test_front_door_side_reports_in_order_and_learns_revocations():
    async def main() -> None:
        batches: list[tuple[list, list, list]] = []
        revoked: list[str] = []

        async def sync(events, returned, held):
            batches.append((events, returned, held))
            return {"revoked": revoked}

        leases = Leases(sync)
        lease = leases.add("a", "tcp://w0", "i0", 2)  # the routed request holds one slot
        other = leases.take("a", "r1", ())
        assert other is lease and leases.take("a", "r2", ()) is None  # both slots busy
        assert leases.take("a", "r3", ("i0",)) is None
        leases.release(lease)
        leases.finish("r0")
        await leases.flush()
        events, returned, held = batches[-1]
        assert [e[:2] for e in events] == [["arrive", "r1"], ["done", "r0"]]
        assert all(e[-1] >= 0 for e in events) and returned == [] and held == ["i0"]
        revoked.append("i0")
        await leases.flush()
        assert leases.held() == {} and leases.take("a", "r4", ()) is None
        leases.release(lease)  # r1 ends on the revoked lease: nothing to free, still reported
        leases.finish("r1")
        await leases.close()
        assert batches[-1][0][0][:2] == ["done", "r1"]

    asyncio.run(main())
