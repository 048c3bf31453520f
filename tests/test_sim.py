"""The simulator: accounting, determinism, warm versus cold, memory, bad inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from warmserve.policy.config import PolicyConfig
from warmserve.policy.state import ClusterSnapshot, Prewarm, Start, Stop, Tier
from warmserve.registry import ModelSpec, Registry
from warmserve.sim.cluster import ClusterSpec, SimInputError, check_workload, load_cluster
from warmserve.sim.costs import load_costs
from warmserve.sim.engine import Simulator
from warmserve.sim.policies import policy_config

GB = 10**9


def make_cluster(models: list[ModelSpec], nodes: int = 1, per_node: int = 4) -> ClusterSpec:
    return ClusterSpec(nodes, per_node, 80 * GB, 1000 * GB, Registry(models), load_costs())


def workload(arrival, model, inp=100, out=10) -> pa.Table:
    n = len(arrival)
    return pa.table(
        {
            "arrival": np.asarray(arrival, np.float64),
            "model": list(model),
            "input_tokens": np.full(n, inp, np.int32),
            "output_tokens": np.full(n, out, np.int32),
        }
    )


class Starter:
    """A test double for the policy: starts an instance on free devices when asked, prewarms
    ``warm`` models at the first tick, and stops instances that sit idle for ``idle`` seconds."""

    name = "starter"

    def __init__(self, warm: tuple[str, ...] = (), idle: float = 1e9) -> None:
        self.warm = warm
        self.idle = idle
        self.prewarmed = False

    def observe(self, model, window, avg, peak) -> None:
        pass

    def _free(self, snap: ClusterSnapshot, tp: int, skip: set[str]) -> tuple[str, ...] | None:
        busy = {d for i in snap.instances for d in i.devices} | skip
        free = [d.id for d in snap.devices if d.id not in busy and not d.resident]
        return tuple(free[:tp]) if len(free) >= tp else None

    def plan(self, snap: ClusterSnapshot):
        actions = []
        if not self.prewarmed:
            self.prewarmed = True
            taken: set[str] = set()
            for m in self.warm:
                devs = self._free(snap, snap.models[m].tp, taken)
                taken |= set(devs)
                actions.append(Prewarm(m, devs, Tier.ENGINE))
        for i in snap.instances:
            if i.load == 0 and snap.time - i.started > self.idle:
                actions.append(Stop(i.id))
        return actions

    def on_demand(self, snap: ClusterSnapshot, model: str):
        for d in snap.devices:
            if model in d.resident:
                group = [e.id for e in snap.devices if model in e.resident]
                return [Start(model, tuple(group[: snap.models[model].tp]))]
        devs = self._free(snap, snap.models[model].tp, set())
        return [Start(model, devs)] if devs else []


A = ModelSpec("a", "llama-7b", 14 * GB, 1)
B = ModelSpec("b", "llama-7b", 14 * GB, 1)
C = ModelSpec("c", "llama-13b", 26 * GB, 2)


def simulate(models, table, policy, **kw):
    cluster = make_cluster(models, **kw)
    return Simulator(cluster, policy, table, policy_config(cluster)).run()


def poisson(rate: float, duration: float, names: list[str], seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, int(rate * duration)))
    return workload(t, rng.choice(names, len(t)), out=20)


def test_every_request_has_one_row_and_a_status():
    table = poisson(20, 120, ["a", "b", "c"])
    run = simulate([A, B, C], table, Starter(idle=10))
    res = run.requests
    assert run.stats["rejected_actions"] == {}  # the simulator's state agrees with the ledger
    assert run.stats["accepted_actions"]["Stop"] > 0
    assert res.num_rows == table.num_rows
    assert res.column("arrival").to_pylist() == table.column("arrival").to_pylist()
    assert set(res.column("status").to_pylist()) <= {"ok", "dropped"}
    ok = np.array(res.column("status").to_pylist()) == "ok"
    ttft = res.column("ttft").to_numpy(zero_copy_only=False)
    assert ok.sum() > 0.9 * len(ok)
    assert (ttft[ok] > 0).all() and np.isnan(ttft[~ok]).all()


def test_same_inputs_give_the_same_output():
    table = poisson(30, 60, ["a", "b", "c"], seed=3)
    one = simulate([A, B, C], table, Starter(warm=("a",), idle=5))
    two = simulate([A, B, C], table, Starter(warm=("a",), idle=5))
    assert one.requests.equals(two.requests)
    assert one.devices.equals(two.devices)


def test_prewarmed_model_starts_much_faster_than_a_cold_one():
    # a is prewarmed (weights and engine up) at t=0; b is on disk. One request each at t=100.
    table = workload([100.0, 100.0], ["a", "b"])
    res = simulate([A, B], table, Starter(warm=("a",))).requests
    ttft = dict(zip(res.column("model").to_pylist(), res.column("ttft").to_pylist(), strict=True))
    tiers = dict(zip(res.column("model").to_pylist(), res.column("tier").to_pylist(), strict=True))
    costs = load_costs()
    assert tiers == {"a": "engine", "b": "disk"}
    # The engine was brought up on a itself: no switch, only the prefill.
    assert ttft["a"] == pytest.approx(0.035)
    assert ttft["b"] > costs.engine_start_s


class Beside:
    """Prewarms a with an engine and b beside it on one device; starts whatever is asked
    there."""

    name = "beside"

    def observe(self, model, window, avg, peak) -> None:
        pass

    def plan(self, snap: ClusterSnapshot):
        if snap.time > 0:
            return []
        d = (snap.devices[0].id,)
        return [Prewarm("a", d, Tier.ENGINE), Prewarm("b", d, Tier.DEVICE)]

    def on_demand(self, snap: ClusterSnapshot, model: str):
        return [Start(model, (snap.devices[0].id,))]


def test_a_model_beside_the_engine_pays_one_switch():
    # b's weights sit beside an engine of its family that holds a: its start is a switch.
    res = simulate([A, B], workload([100.0], ["b"]), Beside()).requests
    assert res.column("tier").to_pylist() == ["engine"]
    assert res.column("ttft").to_pylist()[0] == pytest.approx(load_costs().activate_s + 0.035)


class OnlyA:
    """Prewarms a with an engine on the first device; starts whatever is asked there."""

    name = "only-a"

    def observe(self, model, window, avg, peak) -> None:
        pass

    def plan(self, snap: ClusterSnapshot):
        return [Prewarm("a", (snap.devices[0].id,), Tier.ENGINE)] if snap.time == 0 else []

    def on_demand(self, snap: ClusterSnapshot, model: str):
        return [Start(model, (snap.devices[0].id,))]


def test_an_idle_engine_of_the_family_switches_to_weights_copied_in():
    # b is on disk, but an idle engine of its family (up for a) sits on the device: the worker
    # switches that engine to b's weights once they are copied in, with no engine start. A
    # model of another family pays the engine start.
    costs = load_costs()
    load = costs.disk_load_s(14 * GB) + costs.host_load_s(14 * GB)
    res = simulate([A, B], workload([100.0], ["b"]), OnlyA()).requests
    assert res.column("ttft").to_pylist()[0] == pytest.approx(load + costs.activate_s + 0.035)
    other = ModelSpec("b", "mistral-7b", 14 * GB, 1)
    res = simulate([A, other], workload([100.0], ["b"]), OnlyA()).requests
    assert res.column("ttft").to_pylist()[0] == pytest.approx(load + costs.engine_start_s + 0.035)
    # An instance of another family serving on the device (devices shared) does not stop it.
    small = [ModelSpec(m, f, 2 * GB, 1) for m, f in (("a", A.family), ("b", A.family), ("c", "x"))]
    res = simulate(small, workload([100.0, 200.0], ["c", "b"]), OnlyA()).requests
    load = costs.disk_load_s(2 * GB) + costs.host_load_s(2 * GB)
    assert res.column("status").to_pylist() == ["ok", "ok"]
    assert res.column("ttft").to_pylist()[1] == pytest.approx(load + costs.activate_s, abs=0.1)


def test_second_request_on_a_running_instance_pays_only_prefill():
    table = workload([0.0, 50.0], ["a", "a"])
    res = simulate([A], table, Starter()).requests
    ttft = res.column("ttft").to_pylist()
    assert ttft[1] == pytest.approx(0.035)
    assert ttft[0] > 20


def test_capacity_limits_concurrency_and_queues_the_rest():
    # 40 simultaneous requests of 100 tokens at 15 ms/token: 32 run at once, 8 wait for a slot.
    table = workload(np.full(40, 30.0), ["a"] * 40, out=100)
    cluster = make_cluster([A], per_node=1)
    sim = Simulator(cluster, Starter(warm=("a",)), table, policy_config(cluster))
    res = sim.run().requests
    start = res.column("start").to_numpy()
    assert (start == start.min()).sum() == 32
    assert start.max() == pytest.approx(start.min() + 0.035 + 99 * 0.015)


def test_memory_is_never_overcommitted():
    table = poisson(40, 200, ["a", "b", "c"], seed=1)
    dev = simulate([A, B, C], table, Starter(warm=("a", "b"), idle=3), per_node=4).devices
    used = dev.column("weights_bytes").to_numpy() + dev.column("kv_bytes").to_numpy()
    assert len(used) > 10
    assert (used <= dev.column("memory").to_numpy()).all()
    assert (dev.column("kv_bytes").to_numpy() >= 0).all()
    modes = set(dev.column("mode").to_pylist())
    assert {"idle", "dedicated"} <= modes


def test_requests_with_nowhere_to_go_are_dropped_not_lost():
    class Never(Starter):
        def on_demand(self, snap, model):
            return []

    table = workload([1.0, 2.0, 3.0], ["a", "a", "a"])
    res = simulate([A], table, Never()).requests
    assert res.column("status").to_pylist() == ["dropped"] * 3
    assert all(e for e in res.column("error").to_pylist())


def test_infeasible_actions_are_rejected_and_change_nothing():
    class Wrong(Starter):
        def on_demand(self, snap, model):
            first = snap.devices[0].id
            return [Start("c", (first,)), Prewarm("c", ("n0/d0", "n0/d1"), Tier.ACTIVE)]

    run = simulate([A, C], workload([1.0], ["a"]), Wrong())
    assert run.stats["rejected_actions"] == {"Start": 1, "Prewarm": 1}
    assert run.requests.column("status").to_pylist() == ["dropped"]
    assert set(run.devices.column("mode").to_pylist()) == {"idle"}


def test_cluster_that_cannot_hold_the_largest_model_is_refused():
    big = ModelSpec("big", "llama-70b", 140 * GB, 1)
    with pytest.raises(SimInputError, match="per device"):
        make_cluster([big]).check()
    with pytest.raises(SimInputError, match="tp=8"):
        make_cluster([ModelSpec("wide", "x", 140 * GB, 8)]).check()


def test_workload_with_unknown_model_or_negative_time_is_refused():
    with pytest.raises(SimInputError, match="not in the registry"):
        check_workload(workload([0.0, 1.0], ["a", "zzz"]), ["a"])
    with pytest.raises(SimInputError, match="negative"):
        check_workload(workload([-1.0, 1.0], ["a", "a"]), ["a"])
    with pytest.raises(SimInputError, match="sorted"):
        check_workload(workload([2.0, 1.0], ["a", "a"]), ["a"])


def _files(tmp_path, models: list[dict], arrival=(0.0, 1.0), names=("a", "a")):
    import yaml

    cluster = tmp_path / "c.yaml"
    cluster.write_text(
        yaml.safe_dump(
            {
                "nodes": 1,
                "devices_per_node": 2,
                "device_memory": "80 GB",
                "host_memory": "1 TB",
                "models": models,
            }
        )
    )
    wl = tmp_path / "w.parquet"
    pq.write_table(workload(list(arrival), list(names)), wl)
    return str(cluster), str(wl)


@pytest.mark.parametrize(
    ("models", "arrival", "names", "message"),
    [
        ([{"name": "a", "family": "f", "bytes": "100 GB"}], (0.0,), ("a",), "per device"),
        ([{"name": "a", "family": "f", "bytes": "14 GB"}], (0.0,), ("b",), "not in the registry"),
        ([{"name": "a", "family": "f", "bytes": "14 GB"}], (-5.0,), ("a",), "negative"),
    ],
)
def test_cli_bad_input_exits_2_before_running(tmp_path, models, arrival, names, message):
    from warmserve.sim.cli import command

    cluster, wl = _files(tmp_path, models, arrival, names)
    out = tmp_path / "r.parquet"
    args = ["--workload", wl, "--cluster", cluster, "--policy", "x", "--out", str(out)]
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("memory", "model", "policy", "message"),
    [
        # 156 GB at tp 2: 78 GB of weights per 80 GB device, but one request's KV cache (0.2 GB
        # per device, the default cost model's, warmserve/sim/costs.yaml) and the engine's 2 GB
        # do not fit beside them. (At 150 GB, 3 GB per device are left: 13 requests' KV.)
        ("80 GB", {"bytes": "156 GB", "tp": 2}, "warmserve", "needs 80.2 GB per device"),
        ("80 GB", {"bytes": "156 GB", "tp": 2}, "autoscale", "0.2 GB of KV cache for one request"),
        # 14 GB fits a 40 GB device, but not a half of it (share-slots 2) with its KV cache.
        ("40 GB", {"bytes": "14 GB"}, "share", "share places no model: 2 parts per device"),
    ],
)
def test_cli_setting_that_cannot_serve_exits_2(tmp_path, memory, model, policy, message):
    """A model that can never run, or a baseline that can place nothing, is refused at load
    with the numbers (issue 22), where it used to time out every request or drop them all."""
    import yaml

    from warmserve.sim.cli import command

    cluster = tmp_path / "c.yaml"
    spec = {
        "nodes": 1,
        "devices_per_node": 2,
        "device_memory": memory,
        "host_memory": "1 TB",
        "models": [{"name": "a", "family": "f", **model}],
    }
    cluster.write_text(yaml.safe_dump(spec))
    wl = tmp_path / "w.parquet"
    pq.write_table(workload([0.0], ["a"]), wl)
    out = tmp_path / "r.parquet"
    args = ["--workload", str(wl), "--cluster", str(cluster), "--policy", policy]
    res = CliRunner().invoke(command, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "'a'" in res.output or "share" in res.output
    assert message in res.output
    assert not out.exists()


def test_cluster_file_reads_sizes_and_inline_models(tmp_path):
    cluster, _ = _files(tmp_path, [{"name": "a", "family": "f", "bytes": "14 GB", "tp": 2}])
    spec = load_cluster(cluster)
    assert spec.device_memory == 80 * GB
    assert spec.models["a"].nbytes == 14 * GB and spec.models["a"].tp == 2
    assert spec.device_count == 2


def test_policy_config_charges_what_the_simulator_charges():
    cluster = make_cluster([A, C])
    cfg = policy_config(cluster, PolicyConfig(window=60.0, period=600.0))
    assert cfg.window == 60.0
    assert cfg.kv_per_request(A) == 524288 * 1366
    assert cfg.instance_capacity == cluster.costs.instance_capacity


def test_max_rps_walks_the_grid_up_to_the_first_failure():
    from warmserve.sim.sweep import max_rps, rate_grid

    grid = rate_grid(1, 64, 1)
    assert grid[:3] == [1, 2, 3] and grid[-1] == 64 and rate_grid(5, 6, 0.25)[-1] == 6
    calls: list[float] = []

    def serves(rps: float) -> bool:
        calls.append(rps)
        return rps <= 13.3

    assert max_rps(serves, grid) == 13 and calls == grid[:14]
    calls.clear()
    assert max_rps(serves, grid, stride=8) == 13  # coarse 1, 9, 17 (fails), then 10 to 14
    assert calls == [1, 9, 17, 10, 11, 12, 13, 14]
    assert max_rps(lambda r: False, grid, 8) == 0.0
    assert max_rps(lambda r: True, grid, 8) == 64
    with pytest.raises(ValueError):
        max_rps(serves, [2, 1])


def test_max_rps_cannot_jump_past_a_failure_on_a_non_monotone_serves():
    """Attainment near the limit is not monotone in the rate: a failure at 9 with passes at 10
    to 13 and again at 20 to 30. Bisection on [1, 64] lands near 13 (it never tries 9); the
    walk stops below the first failure it meets."""
    from warmserve.sim.sweep import max_rps, median_rps, rate_grid

    def serves(rps: float) -> bool:
        return (rps <= 13 and rps != 9) or 20 <= rps <= 30

    grid = rate_grid(1, 64, 1)
    assert max_rps(serves, grid) == 8
    assert max_rps(serves, grid, stride=4) == 8  # coarse 1, 5, 9 (fails), then 6 to 8
    assert max_rps(lambda r: r != 9 and r <= 13, grid, stride=8) == 8  # 9 is a coarse rate
    # With a stride, a failure between two coarse rates that passed is never tried (the cost of
    # trying only the top of the grid densely); passes above the first failure never count.
    assert max_rps(lambda r: r != 5 and (r <= 13 or r >= 20), grid, stride=8) == 13
    assert median_rps([8, 13, 11]) == 11


def test_gpus_needed_counts_instances_of_every_model_in_flight():
    """a (7B, one device) and c (13B, two devices) at capacity 2. Each a request lasts
    0.035 + 10 * 0.015 = 0.185 s, each c 0.07 + 10 * 0.02 = 0.27 s: at 1.0 the three a requests
    of that instant need two instances and the one c request one, four devices; the ones of
    time 0 are over. At 5 one a request needs one device."""
    from warmserve.sim.sweep import gpus_needed

    cluster = make_cluster([A, C])
    arrival = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 5.0]
    table = workload(arrival, ["a", "c", "a", "a", "a", "c", "a"], out=11)
    assert gpus_needed(table, cluster, capacity=2, warmup=0.5).tolist() == [4, 4, 4, 4, 1]
    assert gpus_needed(table, cluster, capacity=4, warmup=0.5).tolist() == [3, 3, 3, 3, 1]


def test_sweep_cli_reports_a_rate_per_policy(tmp_path):
    import json

    from warmserve.sim.cli import command
    from warmserve.sim.sweep import median_rps

    cluster, _ = _files(tmp_path, [{"name": "a", "family": "f", "bytes": "14 GB"}])
    out = tmp_path / "s.json"
    args = ["sweep", "--cluster", cluster, "--policy", "autoscale", "--duration", "120"]
    args += ["--warmup", "60", "--lo", "1", "--hi", "8", "--step", "2", "--seeds", "0,1"]
    res = CliRunner().invoke(command, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    found = doc["policies"]["autoscale"]
    assert set(found["max_rps_by_seed"]) == {"0", "1"}
    assert all(v in (0.0, 1, 3, 5, 7) for v in found["max_rps_by_seed"].values())
    assert found["max_rps"] == median_rps(list(found["max_rps_by_seed"].values()))
    assert set(found["attainment_by_rps"]) == {"0", "1"} and found["attainment_by_rps"]["0"]
    # The JSON names the command that made it, options and all.
    assert doc["command"].startswith(f"warmserve simulate sweep --cluster {cluster} --policy")
    assert "--lo 1 --hi 8" in doc["command"] and f"--seeds 0,1 --out {out}" in doc["command"]


@pytest.fixture(scope="module")
def paper_workload() -> tuple[ClusterSpec, pa.Table]:
    from warmserve.traces.synth import synthesize

    spec = load_cluster("clusters/paper.yaml")
    return spec, synthesize(list(spec.models), 0.5, 8.0, 900.0, seed=2)


@pytest.mark.parametrize(
    "name",
    ["warmserve", "autoscale", "share", "warmserve-noprewarm", "warmserve-noplacement"],
)
def test_shipped_policies_run_clean_on_the_paper_cluster(paper_workload, name):
    from warmserve.sim.policies import build_policy

    spec, table = paper_workload
    cfg = policy_config(spec)
    run = Simulator(spec, build_policy(name, spec, cfg), table, cfg).run()
    assert run.requests.num_rows == table.num_rows
    assert run.stats["rejected_actions"] == {}
    assert run.stats["ok"] > 0.8 * table.num_rows
    dev = run.devices
    used = dev.column("weights_bytes").to_numpy() + dev.column("kv_bytes").to_numpy()
    assert (used <= dev.column("memory").to_numpy()).all()


def test_cli_writes_results_and_device_timeline_that_the_report_reads(tmp_path):
    from warmserve.report.cli import command as report
    from warmserve.report.schema import REQUIRED, devices_path
    from warmserve.sim.cli import command

    cluster, wl = _files(
        tmp_path,
        [{"name": "a", "family": "f", "bytes": "14 GB"}],
        arrival=(0.0, 1.0, 30.0, 31.0),
        names=("a", "a", "a", "a"),
    )
    out = tmp_path / "r.parquet"
    args = ["--workload", wl, "--cluster", cluster, "--policy", "autoscale", "--out", str(out)]
    res = CliRunner().invoke(command, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.num_rows == 4 and set(REQUIRED) <= set(table.column_names)
    assert table.schema.metadata[b"policy"] == b"autoscale"
    assert pq.read_table(devices_path(out)).num_rows > 0
    rep = CliRunner().invoke(report, [str(out)])
    assert rep.exit_code == 0, rep.output
    assert "| autoscale |" in rep.output
