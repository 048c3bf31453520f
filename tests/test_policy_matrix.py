"""The policy matrix's settings (clusters/matrix/), their workload recipes and the bench that
runs them (bench/policy_matrix.py), on spans short enough for a test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner

from bench import policy_matrix
from warmserve.report.metrics import gpu_seconds
from warmserve.report.schema import DEVICE_SCHEMA
from warmserve.sim.cli import command as simulate
from warmserve.sim.cluster import check_workload
from warmserve.sim.policies import build_policy, live_config, policy_config
from warmserve.sim.recipe import RecipeError, load_recipe, load_setting

ROOT = Path(__file__).resolve().parents[1]
MATRIX = sorted((ROOT / "clusters" / "matrix").glob("*.yaml"))


def test_the_matrix_covers_issue_22s_settings():
    settings = [load_setting(p) for p in MATRIX]
    shapes = {
        (s.cluster.nodes, s.cluster.devices_per_node, s.cluster.device_memory // 10**9)
        for s in settings
    }
    assert {(2, 8, 80), (1, 8, 48), (2, 8, 24), (4, 8, 40)} <= shapes
    alphas = {s.recipe.alpha for s in settings if len(s.cluster.models) == 7}
    assert alphas == {0.5, 2.0}  # the paper's cluster at both popularities
    assert any(len(s.cluster.models) >= 100 and s.recipe.alpha == 1.5 for s in settings)
    assert any(
        len(s.cluster.models) == 40 and sum(m.tp == 4 for m in s.cluster.models.values()) == 2
        for s in settings
    )
    traces = {t for s in settings for t in s.recipe.trace}
    assert {"servegen", "burstgpt", "azure"} <= traces


@pytest.mark.parametrize("path", MATRIX, ids=[p.stem for p in MATRIX])
def test_every_setting_loads_and_its_recipe_makes_a_workload(path):
    s = load_setting(path)
    r = s.recipe
    assert r.seeds == (0, 1, 2)
    assert r.warmup >= 3600 and r.duration >= 3600
    assert set(r.rates) == {"low", "high"} and r.rates["low"] < r.rates["high"]
    config = policy_config(s.cluster, live_config())
    for policy in ("warmserve", "autoscale"):  # every model can serve somewhere
        build_policy(policy, s.cluster, config)
    table = r.scaled(60 / (r.warmup + r.duration)).workload(list(s.cluster.models), "low", 0)
    assert table.num_rows > 0
    check_workload(table, s.cluster.models)
    # bf16 weights: 2 bytes a parameter of the nominal size (Llama 3.2 3B has 3.21 B)
    for m in s.cluster.models.values():
        size = re.search(r"(\d+)b", m.family.split("-")[-1]).group(1)
        assert abs(m.nbytes / (2e9 * int(size)) - 1) < 0.11, m


def _write(tmp_path: Path, workload, name: str = "s.yaml", **cluster) -> str:
    doc = {
        "nodes": 1,
        "devices_per_node": 2,
        "device_memory": "80 GB",
        "host_memory": "1 TB",
        "models": [{"name": "a", "family": "llama-2-7b", "bytes": "14 GB", "tp": 1}],
        **cluster,
    }
    if workload is not None:
        doc["workload"] = workload
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


GOOD = {
    "trace": "burstgpt",
    "alpha": 1.0,
    "rates": {"low": 2, "high": 4},
    "seeds": [0, 1, 2],
    "warmup": 30,
    "duration": 30,
}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"alpha": -1}, "workload.alpha"),
        ({"alpha": "x"}, "workload.alpha"),
        ({"rates": None}, "workload.rates"),
        ({"rates": {"low": 0}}, "workload.rates.low"),
        ({"seeds": [0, 0]}, "workload.seeds"),
        ({"seeds": "0"}, "workload.seeds"),
        ({"duration": 0}, "workload.duration"),
        ({"trace": "nope"}, "workload.trace[0]"),
        ({"trace": ["burstgpt", "missing.parquet"]}, "workload.trace[1]"),
        ({"tokens": "nope"}, "workload.tokens"),
        ({"rate": 3}, "workload.rate"),
        ({"warmup": None}, "workload.warmup"),
    ],
)
def test_a_malformed_recipe_names_the_file_and_key(tmp_path, change, key):
    recipe = {**GOOD, **change}
    if change.get("warmup", 0) is None:
        del recipe["warmup"]
    path = _write(tmp_path, recipe)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: ")
    assert key in str(err.value)


def test_a_cluster_file_without_a_recipe_is_no_setting(tmp_path):
    path = _write(tmp_path, None)
    assert load_recipe(path) is None
    with pytest.raises(RecipeError, match=r"s\.yaml: workload: missing"):
        load_setting(path)


def test_simulate_makes_the_workload_from_the_recipe(tmp_path):
    path = _write(tmp_path, GOOD)
    out = str(tmp_path / "r.parquet")
    run = CliRunner().invoke(
        simulate, ["--cluster", path, "--policy", "autoscale", "--rate", "low", "--out", out]
    )
    assert run.exit_code == 0, run.output
    assert Path(out).exists()
    bad = CliRunner().invoke(
        simulate, ["--cluster", path, "--policy", "autoscale", "--rate", "mid", "--out", out]
    )
    assert bad.exit_code == 2
    assert "workload.rates has no 'mid'" in bad.output


def test_gpu_seconds_from_a_start():
    rows = [(0.0, "d0", "dedicated"), (10.0, "d0", "idle"), (20.0, "d0", "universal")]
    cols = {f.name: [] for f in DEVICE_SCHEMA}
    for t, d, mode in rows:
        for f in DEVICE_SCHEMA:
            cols[f.name].append(
                {"time": t, "device": d, "mode": mode}.get(
                    f.name, 0 if pa.types.is_integer(f.type) else ""
                )
            )
    table = pa.table(cols, schema=DEVICE_SCHEMA)
    assert gpu_seconds(table, end=30)["gpu_seconds_held"] == 20
    assert gpu_seconds(table, end=25, start=5)["gpu_seconds_held"] == 10


def test_policy_matrix_smoke(tmp_path):
    """One real setting at a fiftieth of its span, and a setting with a model that can never
    serve: the second is reported, the first still runs, and the files have their keys."""
    matrix = tmp_path / "matrix"
    matrix.mkdir()
    (matrix / "paper-a2.yaml").write_text((ROOT / "clusters/matrix/paper-a2.yaml").read_text())
    _write(
        matrix,
        GOOD,
        name="toobig.yaml",
        models=[{"name": "huge", "family": "llama-2-70b", "bytes": "156 GB", "tp": 2}],
    )
    out = tmp_path / "pm"
    args = ["--matrix", str(matrix), "--rates", "low", "--seeds", "0", "--scale", "0.02"]
    args += ["--policies", "warmserve,autoscale,share", "--share-slots", "1,3"]
    args += ["--jobs", "1", "--out", str(out)]
    run = CliRunner().invoke(policy_matrix.main, args)
    assert run.exit_code == 0, run.output
    doc = json.loads(Path(f"{out}.json").read_text())
    assert {"command", "wall_s", "targets", "comparisons", "settings", "runs"} <= set(doc)
    assert "needs" in doc["settings"]["toobig"]["error"]  # never_serve's message
    cell = doc["settings"]["paper-a2"]["rates"]["low"]
    assert set(cell["policies"]) == {"warmserve", "autoscale", "share"}
    for c in cell["policies"].values():
        assert set(policy_matrix.METRICS) <= set(c), c
    share = cell["policies"]["share"]
    assert share["share_slots"] == 1 and "error" in share["layouts"]["3"]
    assert doc["comparisons"]["paper-a2/low"]["best_baseline"] in ("autoscale", "share")
    assert Path(f"{out}.md").read_text().startswith("# Policy matrix")
    assert Path(f"{out}_slo.png").stat().st_size > 0


def _cell(slo: float, under: float = 0.5, starts: float = 10.0) -> dict:
    return {
        "slo_attainment": slo,
        "under_100ms": under,
        "ttft_p99": 1.0,
        "starts_per_hour": starts,
    }


def test_share_keeps_its_best_layout_and_warmserve_is_compared_with_the_best_baseline():
    layouts = {
        1: _cell(0.90, 0.5),
        2: _cell(0.95, 0.4),
        3: _cell(0.95, 0.6),
        4: {"error": "share places no model"},
    }
    share = policy_matrix.best_share(layouts)
    assert share["share_slots"] == 3 and share["layouts"]["4"] == {"error": "share places no model"}
    none = policy_matrix.best_share({4: {"error": "x"}})
    assert none["error_kind"] == "load" and "4 slots: x" in none["error"]
    c = policy_matrix.compare(
        {"warmserve": _cell(0.97, starts=40.0), "autoscale": _cell(0.99), "share": share}
    )
    assert c["best_baseline"] == "autoscale" and c["points_ahead"] == -2.0
    assert c["starts_vs_autoscale"] == 4.0 and c["starts_over_3x_autoscale"]
    quiet = policy_matrix.compare(
        {"warmserve": _cell(0.97, starts=1.0), "autoscale": _cell(0.9, starts=0.0)}
    )
    assert quiet["starts_vs_autoscale"] is None and quiet["starts_over_3x_autoscale"]
    t = policy_matrix.targets({"a/low": c, "b/low": quiet})
    assert t["warmserve >= best baseline - 0.5 point, every cell"] == "1 of 2; behind on a/low"
    assert t["warmserve starts/h <= 3x autoscale's, every cell"].startswith("0 of 2")


def test_record_starts_sees_every_start_the_cluster_accepts():
    from warmserve.sim.engine import Simulator

    s = load_setting(ROOT / "clusters/matrix/mixed24-8x48.yaml")
    recipe = s.recipe.scaled(0.05)
    config = policy_config(s.cluster, live_config())
    table = recipe.workload(list(s.cluster.models), "high", 0)
    sim = Simulator(s.cluster, build_policy("autoscale", s.cluster, config), table, config)
    starts = policy_matrix.record_starts(sim)
    res = sim.run()
    assert len(starts) == res.stats["accepted_actions"]["Start"] > 0
    assert {tier for _, _, tier in starts} <= {"disk", "host", "device", "engine", "active"}


def test_policy_matrix_joins_result_files(tmp_path):
    common = ["--settings", "paper-a2", "--rates", "low", "--seeds", "0", "--scale", "0.01"]
    common += ["--jobs", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out, policy in ((a, "warmserve"), (b, "autoscale")):
        run = CliRunner().invoke(
            policy_matrix.main, [*common, "--policies", policy, "--out", str(out)]
        )
        assert run.exit_code == 0, run.output
    run = CliRunner().invoke(
        policy_matrix.main, ["--markdown-only", "--out", str(a), "--add", f"{b}.json"]
    )
    assert run.exit_code == 0, run.output
    doc = json.loads(Path(f"{a}.json").read_text())
    assert set(doc["settings"]["paper-a2"]["rates"]["low"]["policies"]) == {
        "warmserve",
        "autoscale",
    }
    assert doc["comparisons"]["paper-a2/low"]["best_baseline"] == "autoscale"
    assert [c["file"] for c in doc["combined_from"]] == [f"{b}.json"]
    assert doc["combined_from"][0]["runs"] == 1
