"""The report's numbers on small hand-made result files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from warmserve.report.cli import command
from warmserve.report.load import model_load
from warmserve.report.metrics import device_seconds, gpu_seconds, request_metrics
from warmserve.report.schema import DEVICE_SCHEMA, devices_path

TTFT = [0.05, 0.08, 0.2, 1.5, 0.1, 3.0, 0.04, 0.11]


def results(ttft=TTFT, dropped=2, policy="p") -> pa.Table:
    n = len(ttft) + dropped
    table = pa.table(
        {
            "model": ["m"] * n,
            "arrival": np.arange(n, dtype=np.float64),
            "ttft": list(ttft) + [float("nan")] * dropped,
            "tpot": [0.015] * len(ttft) + [float("nan")] * dropped,
            "output_tokens": np.full(n, 10, np.int32),
            "status": ["ok"] * len(ttft) + ["dropped"] * dropped,
            "error": [""] * len(ttft) + ["queue full"] * dropped,
        }
    )
    return table.replace_schema_metadata({b"policy": policy.encode()})


def test_percentiles_and_fractions_match_numpy():
    m = request_metrics(results(), slo_ttft=0.1)
    ok = np.array(TTFT)
    for q in (50, 95, 99):
        assert m[f"ttft_p{q}"] == pytest.approx(np.percentile(ok, q))
    assert m["requests"] == 10 and m["ok"] == 8 and m["not_ok"] == 2
    # 4 of 10 requests at or under 100 ms: dropped ones count as misses
    assert m["under_100ms"] == pytest.approx(0.4)
    assert m["slo_attainment"] == pytest.approx(0.4)
    assert request_metrics(results(), slo_ttft=0.2)["slo_attainment"] == pytest.approx(0.6)
    assert m["tpot_p50"] == pytest.approx(0.015)
    assert m["errors"] == {"queue full": 2}


def test_result_without_required_columns_is_refused():
    with pytest.raises(ValueError, match="lacks columns"):
        request_metrics(pa.table({"model": ["m"], "ttft": [0.1]}))


def timeline() -> pa.Table:
    rows = [  # device d0: idle 0-10, dedicated 10-30, universal 30-40; d1: universal 0-40
        (0.0, "d0", "idle"),
        (10.0, "d0", "dedicated"),
        (30.0, "d0", "universal"),
        (0.0, "d1", "universal"),
        (40.0, "d1", "universal"),
    ]
    n = len(rows)
    return pa.table(
        {
            "time": [r[0] for r in rows],
            "device": [r[1] for r in rows],
            "node": ["n0"] * n,
            "mode": [r[2] for r in rows],
            "memory": [80] * n,
            "weights_bytes": [0] * n,
            "kv_bytes": [0] * n,
            "lent_bytes": [0] * n,
            "serving": [""] * n,
            "resident": [""] * n,
        },
        schema=DEVICE_SCHEMA,
    )


def test_gpu_seconds_integrate_the_device_timeline():
    by_mode = device_seconds(timeline())
    assert by_mode == {"idle": 10.0, "dedicated": 20.0, "universal": 50.0}
    assert gpu_seconds(timeline()) == {"gpu_seconds_held": 70.0, "gpu_seconds_serving": 20.0}


def test_cli_writes_table_json_and_plots(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(results(policy="warm"), a)
    pq.write_table(timeline(), devices_path(a))
    pq.write_table(results(ttft=[x * 10 for x in TTFT], policy="cold"), b)
    out = tmp_path / "rep"
    res = CliRunner().invoke(command, [str(a), str(b), "--out-dir", str(out)])
    assert res.exit_code == 0, res.output
    assert "| warm |" in res.output and "| cold |" in res.output
    data = json.loads((out / "report.json").read_text())
    assert data["warm"]["gpu_seconds_serving"] == 20.0
    assert "gpu_seconds_held" not in data["cold"]
    assert data["cold"]["under_100ms"] == 0.0
    assert (out / "ttft_cdf.png").stat().st_size > 1000
    assert (out / "devices_0.png").stat().st_size > 1000
    assert (out / "load_0.png").stat().st_size > 1000 and (out / "load_1.png").exists()
    assert set(data["warm"]["forecast_wape"]) == {"avg", "peak"}


def spans(start, end) -> pa.Table:
    """Result rows of one model's requests in flight over [start, end)."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    return pa.table({"model": ["m"] * len(start), "arrival": start, "finish": end})


def test_load_per_window_is_the_mean_and_peak_in_flight():
    # [0, 10) and [5, 15) in windows of 10 s: 15 s of load in the first window (1.5 on
    # average, 2 at once at most), 5 s in the second; a span ending where another starts
    # does not overlap it.
    load = model_load(spans([0.0, 5.0, 20.0], [10.0, 15.0, 25.0]), window=10.0, period=30.0)
    np.testing.assert_allclose(load.avg[0], [1.5, 0.5, 0.5])
    np.testing.assert_allclose(load.peak[0], [2, 1, 1])
    load = model_load(spans([0.0, 10.0], [10.0, 20.0]), window=10.0, period=20.0)
    np.testing.assert_allclose(load.avg[0], [1, 1])
    np.testing.assert_allclose(load.peak[0], [1, 1])


def test_forecast_follows_a_steady_load_per_model():
    """A live replay's rows (arrival + latency): a model with one request always in flight is
    forecast at 1; another with none late in the run falls to 0."""
    n = 400
    arrival = np.concatenate([np.arange(n, dtype=np.float64), np.arange(50, dtype=np.float64)])
    table = pa.table(
        {
            "model": ["a"] * n + ["b"] * 50,
            "arrival": arrival,
            "latency": np.concatenate([np.ones(n), np.full(50, 0.5)]),
            "ttft": np.full(n + 50, 0.01),
        }
    )
    load = model_load(table, window=10.0, period=100.0)
    assert load.models == ["a", "b"]
    assert load.avg.shape == (2, 40)
    np.testing.assert_allclose(load.avg[0], 1.0)
    # The first window of the second period still carries the first period's cold start, and
    # the average plane reweighs slowly, so experts that saw it keep a share of 1e-4 or so.
    np.testing.assert_allclose(load.forecast_avg[0, 12:], 1.0, rtol=1e-3)
    assert load.forecast_peak[1, -1] == pytest.approx(0.0, abs=1e-6)
    assert load.wape()["avg"] < 0.1


def test_cli_refuses_a_period_shorter_than_the_window(tmp_path):
    a = tmp_path / "a.parquet"
    pq.write_table(results(), a)
    res = CliRunner().invoke(command, [str(a), "--window", "60", "--period", "30"])
    assert res.exit_code == 2 and "--period" in res.output
