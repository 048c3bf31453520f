"""Parquet traces: conversion of the real raw files, validation, synthesis, stats and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from warmserve.policy.load import LoadMeter
from warmserve.registry import ModelSpec, Registry
from warmserve.traces import convert, servegen, stats
from warmserve.traces.cli import command as trace_cli
from warmserve.traces.schema import (
    LICENSE,
    SCHEMA,
    SHA256,
    TraceError,
    read_workload,
    workload_metadata,
    write_workload,
)
from warmserve.traces.synth import popularity, synthesize

REPO = Path(__file__).resolve().parents[1]
RAW = (REPO / ".." / "shared" / "traces" / "raw").resolve()
SAMPLES = REPO / "traces"
needs_raw = pytest.mark.skipif(
    not RAW.is_dir(), reason=f"raw traces not found at {RAW} (../shared/traces/raw from the repo)"
)

# Row counts and sha256 prefixes as SOURCES.md lists them.
REAL = [
    ("azure_llm_2023/AzureLLMInferenceTrace_conv.csv", "azure", 19366, "2f1e5b666d4e3055"),
    ("azure_llm_2023/AzureLLMInferenceTrace_code.csv", "azure", 8819, "54e9a6d2a4bd06ba"),
    ("burstgpt/BurstGPT_1_first7days.csv", "burstgpt", 19431, "68130aef7579045f"),
    ("mooncake/conversation_trace.jsonl", "mooncake", 12031, "b8cbb061a85206d7"),
    ("mooncake/synthetic_trace.jsonl", "mooncake", 3993, "bd070915a98fc0ed"),
]


def run(*args: str):
    return CliRunner().invoke(trace_cli, [str(a) for a in args])


def table(arrival, model=None, inp=None, out=None) -> pa.Table:
    n = len(arrival)
    return pa.Table.from_arrays(
        [
            pa.array(arrival, pa.float64()),
            pa.array(model or ["m"] * n, pa.string()),
            pa.array(inp if inp is not None else [10] * n, pa.int32()),
            pa.array(out if out is not None else [5] * n, pa.int32()),
        ],
        schema=SCHEMA,
    )


# --- conversion of the real files ---------------------------------------------------------------


@needs_raw
@pytest.mark.parametrize(("name", "fmt", "rows", "sha"), REAL)
def test_real_file_converts_with_its_row_count(tmp_path, name, fmt, rows, sha):
    out = tmp_path / "w.parquet"
    result = run("convert", RAW / name, "--out", out)
    assert result.exit_code == 0, result.output
    w = read_workload(out)
    assert w.num_rows == rows
    assert convert.detect_format(RAW / name) == fmt
    meta = workload_metadata(w)
    assert meta[SHA256] == sha and meta["format"] == fmt
    assert meta[LICENSE].startswith("Apache-2.0" if fmt == "mooncake" else "CC-BY-4.0")
    arrival = w["arrival"].to_numpy()
    assert arrival[0] == 0.0 or fmt == "burstgpt"
    assert (np.diff(arrival) >= 0).all()


@needs_raw
def test_real_file_spans_and_models_match_sources_md():
    conv, meta = convert.convert_azure(RAW / REAL[0][0])
    assert abs(conv["arrival"][-1].as_py() / 60 - 58.4) < 0.1  # 18:15:46.68 -> 19:14:08.40
    assert meta["start"].startswith("2023-11-16 18:15:46.68")
    assert set(conv["model"].to_pylist()) == {"azure-conv"}
    assert abs(pc.mean(conv["output_tokens"]).as_py() - 211) < 1

    burst, _ = convert.convert_burstgpt(RAW / REAL[2][0])
    names, counts = np.unique(burst["model"].to_numpy(zero_copy_only=False), return_counts=True)
    assert dict(zip(names, counts, strict=True)) == {"ChatGPT": 12845, "GPT-4": 6586}
    assert burst["arrival"][-1].as_py() == 604758.0
    dropped, meta = convert.convert_burstgpt(RAW / REAL[2][0], drop_failures=True)
    assert dropped.num_rows == 19431 - 1538 and meta["failures"] == "dropped"

    moon, _ = convert.convert_mooncake(RAW / REAL[3][0])
    assert moon["arrival"][-1].as_py() == 3536.999
    assert set(moon["model"].to_pylist()) == {"mooncake-conversation"}


@needs_raw
def test_servegen_rates_convert_aggregate_and_pick_top_clients(tmp_path):
    src = RAW / "servegen" / "servegen_client_windows_long.csv.gz"
    rates = servegen.convert_servegen(src)
    assert rates.num_rows == 648576
    clients = rates.group_by(["model"]).aggregate([("client_id", "count_distinct")])
    assert dict(zip(*clients.to_pydict().values(), strict=True)) == {
        "m-large": 162, "m-mid": 109, "m-small": 43, "deepseek-r1": 73, "mm-image": 35
    }  # fmt: skip
    agg = servegen.aggregate(rates)
    large = agg.filter(pc.field("model") == "m-large")
    assert large.num_rows == 2016
    assert 180 < pc.mean(large["rate_rps"]).as_py() < 210  # SOURCES.md: about 196 req/s
    top = servegen.top_clients(rates, 2)
    picked = top.group_by(["model"]).aggregate([("client_id", "count_distinct")])
    assert picked["client_id_count_distinct"].to_pylist() == [2] * 5
    assert top.num_rows == 3 * 2 * 2016 + 2 * 2 * 144
    out = tmp_path / "sg.parquet"
    result = run("convert", src, "--category", "language", "--aggregate", "--top-clients", 1,
                 "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    written = servegen.read_rates(out)
    assert set(written["model"].to_pylist()) == {"m-large", "m-mid", "m-small"}
    assert sorted(set(written["client_id"].to_pylist()))[0] == servegen.AGGREGATE
    assert written.num_rows == 3 * 2 * 2016


def test_servegen_sampler_matches_window_rates_and_is_seeded():
    rates = servegen.read_rates(SAMPLES / "servegen_language.parquet")
    cid = 148  # one of m-large's three largest clients, about 13 requests/s
    day = rates.filter(
        (pc.field("model") == "m-large")
        & (pc.field("client_id") == cid)
        & (pc.field("window_start_s") < 86400)
    )
    expected = pc.sum(day["rate_rps"]).as_py() * servegen.WINDOW
    a = servegen.sample_arrivals(rates, "m-large", cid, 0, 86400, np.random.default_rng(1))
    b = servegen.sample_arrivals(rates, "m-large", cid, 0, 86400, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert 0.9 < len(a) / expected < 1.1
    assert a.min() >= 0 and a.max() < 86400 and (np.diff(a) >= 0).all()
    # The window rates are followed: the per-window counts correlate with the rates.
    counts = np.bincount((a // servegen.WINDOW).astype(int), minlength=144)
    assert np.corrcoef(counts, day["rate_rps"].to_numpy())[0, 1] > 0.9
    # Only the aggregate left for a model: Poisson at the summed rate, in the asked range.
    agg = servegen.sample_arrivals(rates, "m-small", None, 3000, 3600, np.random.default_rng(2))
    agg_rows = rates.filter(pc.field("client_id") == servegen.AGGREGATE)
    agg_only = servegen.sample_arrivals(
        agg_rows, "m-small", None, 3000, 3600, np.random.default_rng(2)
    )
    rate = agg_rows.filter((pc.field("model") == "m-small") & (pc.field("window_start_s") == 3000))[
        "rate_rps"
    ][0].as_py()
    assert agg_only.min() >= 3000 and agg_only.max() < 3600
    assert abs(len(agg_only) / (rate * 600) - 1) < 0.05
    assert len(agg) < len(agg_only)  # the top 3 clients carry only part of the sum


# --- schema validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "row", "column"),
    [
        (lambda t: t.drop_columns(["model"]), None, "model"),
        (lambda t: t.set_column(0, "arrival", pa.array([0, 1, 2, 3], pa.int64())), None, "arrival"),
        (lambda t: t.set_column(0, "arrival", pa.array([0.0, 1.0, -2.0, 3.0])), 3, "arrival"),
        (lambda t: t.set_column(0, "arrival", pa.array([0.0, float("nan"), 2, 3])), 2, "arrival"),
        (lambda t: t.set_column(0, "arrival", pa.array([0.0, 2.0, 3.0, 2.5])), 4, "arrival"),
        (lambda t: t.set_column(3, "output_tokens", pa.array([1, 2, 3, -4], pa.int32())), 4,
         "output_tokens"),
        (lambda t: t.set_column(2, "input_tokens", pa.array([1, None, 3, 4], pa.int32())), 2,
         "input_tokens"),
    ],
)  # fmt: skip
def test_read_workload_names_file_row_and_column(tmp_path, bad, row, column):
    path = tmp_path / "bad.parquet"
    pq.write_table(bad(table([0.0, 1.0, 2.0, 3.0])), path)
    with pytest.raises(TraceError) as err:
        read_workload(path)
    assert err.value.row == row and err.value.column == column
    assert str(path) in str(err.value) and repr(column) in str(err.value)
    if row is not None:
        assert f"row {row}" in str(err.value)


def test_write_workload_round_trips_and_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "w.parquet"
    write_workload(table([0.0, 0.5, 0.5]), path, {LICENSE: "test"})
    back = read_workload(path)
    assert back.schema.remove_metadata() == SCHEMA.remove_metadata()
    assert workload_metadata(back)[LICENSE] == "test"
    before = path.read_bytes()
    with pytest.raises(TraceError, match="row 2"):
        write_workload(table([1.0, 0.0]), path, {})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.parquet"]  # no temporary file left


def test_dictionary_model_column_is_accepted(tmp_path):
    t = table([0.0, 1.0])
    t = t.set_column(1, "model", t["model"].dictionary_encode())
    path = tmp_path / "d.parquet"
    pq.write_table(t, path)
    assert read_workload(path).schema.field("model").type == pa.string()


# --- malformed raw input through the CLI ----------------------------------------------------------

AZURE_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
STAMP = "2023-11-16 18:15:4{}.6805900"


@pytest.mark.parametrize(
    ("name", "text", "fmt", "expect"),
    [
        ("a.csv", AZURE_HEAD + f"{STAMP.format(1)},3,4\n{STAMP.format(2)},x7,4\n", "azure",
         ["row 2", "'ContextTokens'", "'x7'"]),
        ("a.csv", AZURE_HEAD + f"{STAMP.format(1)},3,4\n2023-13,3,4\n", "azure",
         ["row 2", "'TIMESTAMP'"]),
        ("a.csv", AZURE_HEAD + f"{STAMP.format(1)},3,4\n{STAMP.format(2)},3,-4\n", "azure",
         ["row 2", "'GeneratedTokens'", "negative"]),
        ("a.csv", AZURE_HEAD + f"{STAMP.format(1)},3,4\n{STAMP.format(2)},3\n", "azure",
         ["row 2", "expected 3 fields"]),
        ("a.csv", AZURE_HEAD + f"{STAMP.format(1)},3,\n", "azure",
         ["row 1", "'GeneratedTokens'"]),
        ("a.csv", "TIMESTAMP,ContextTokens\n" + f"{STAMP.format(1)},3\n", "azure",
         ["'GeneratedTokens'", "missing column"]),
        ("a.csv", AZURE_HEAD, "azure", ["no data rows"]),
        ("a.csv", "", "azure", ["empty"]),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 2}\n'
         '{"timestamp": 5, "input_length": 1, "output_length": 2}\n'
         '{"timestamp": "x", "input_length": 1, "output_length": 2}\n', "mooncake",
         ["row 3", "'timestamp'", "'x'"]),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 2}\n'
         '{"timestamp": 5, "input_length": 1}\n', "mooncake", ["row 2", "'output_length'"]),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 2}\n{"timestamp": 5,\n',
         "mooncake", ["row 2", "not valid JSON"]),
        ("s.csv", "category,model,client_id,window_start_s,rate_rps,cv,arrival_dist,dist_param1,"
         "dist_param2\nlanguage,m,0,0,1.5,2,Gamma,0.2,3\nlanguage,m,0,600,1.5,2,Lognormal,1,1\n",
         "servegen", ["row 2", "'arrival_dist'", "Lognormal"]),
    ],
)  # fmt: skip
def test_malformed_input_exits_2_naming_row_and_column(tmp_path, name, text, fmt, expect):
    src = tmp_path / name
    src.write_text(text)
    out = tmp_path / "out.parquet"
    result = run("convert", src, "--format", fmt, "--out", out)
    assert result.exit_code == 2, result.output
    assert str(src) in result.output
    for piece in expect:
        assert piece in result.output
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == [name]


def test_unknown_format_exits_2(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("when,what\n1,2\n")
    result = run("convert", src, "--out", tmp_path / "o.parquet")
    assert result.exit_code == 2 and "unknown trace format" in result.output
    assert run("convert", src, "--format", "x", "--out", "o").exit_code == 2
    empty = tmp_path / "e.csv"
    empty.write_text("")
    result = run("convert", empty, "--out", tmp_path / "o.parquet")
    assert result.exit_code == 2 and "empty" in result.output


def test_gzip_detection(tmp_path):
    src = tmp_path / "s.csv.gz"
    with gzip.open(src, "wt") as f:
        f.write(
            "category,model,client_id,window_start_s,rate_rps,cv,arrival_dist,dist_param1,"
            "dist_param2\nlanguage,m,0,0,1.5,2,Gamma,0.25,2.6\nlanguage,m,0,600,0,0,,0,0\n"
        )
    assert convert.detect_format(src) == "servegen"
    result = run("convert", src, "--out", tmp_path / "r.parquet")
    assert result.exit_code == 0, result.output
    rates = servegen.read_rates(tmp_path / "r.parquet")
    assert rates["dist"].to_pylist() == ["Gamma", None]


@needs_raw
def test_python_dash_m_subprocess(tmp_path):
    out = tmp_path / "code.parquet"
    src = RAW / REAL[1][0]
    ok = subprocess.run(
        [sys.executable, "-m", "warmserve", "trace", "convert", str(src), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert read_workload(out).num_rows == 8819
    assert set(read_workload(out)["model"].to_pylist()) == {"azure-code"}


# --- synthesis ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_day_source(tmp_path_factory) -> Path:
    """A workload with load only in the first half of each day (of two days): a visible shape."""
    rng = np.random.default_rng(7)
    day = np.sort(rng.uniform(0, 43200, 4000))
    arrival = np.concatenate([day, day + 86400])
    path = tmp_path_factory.mktemp("src") / "halfday.parquet"
    write_workload(table(arrival), path, {LICENSE: "test-only"})
    return path


def test_synth_is_deterministic_and_follows_popularity(half_day_source):
    kw = {"cv": None, "compress": 432.0, "sources": [half_day_source], "tokens": half_day_source}
    a = synthesize(3, 1.0, 60.0, 100.0, seed=3, **kw)
    b = synthesize(3, 1.0, 60.0, 100.0, seed=3, **kw)
    c = synthesize(3, 1.0, 60.0, 100.0, seed=4, **kw)
    assert a.equals(b) and not a.equals(c)
    assert workload_metadata(a) == workload_metadata(b)
    names, counts = np.unique(a["model"].to_numpy(zero_copy_only=False), return_counts=True)
    assert list(names) == ["model-0", "model-1", "model-2"]
    assert np.allclose(counts / counts.sum(), popularity(3, 1.0), rtol=0.1)
    assert abs(a.num_rows / (60.0 * 100.0) - 1) < 0.05  # total rate is what was asked
    assert json.loads(workload_metadata(a)["synth"])["segments"][1]["day"] == 1


def test_compression_maps_a_day_onto_the_replay(half_day_source):
    kw = {"sources": [half_day_source], "tokens": half_day_source, "seed": 1}
    whole_day = synthesize(1, 0.0, 20.0, 100.0, compress=864.0, **kw)["arrival"].to_numpy()
    assert whole_day.max() < 50.0  # the busy half day is the first 50 s of replay
    assert whole_day.size == pytest.approx(2000, rel=0.1)
    half_day = synthesize(1, 0.0, 20.0, 100.0, compress=432.0, **kw)["arrival"].to_numpy()
    assert (half_day > 50.0).sum() > 0.4 * half_day.size  # only busy time is covered


def test_synth_cv_makes_bursts(half_day_source):
    kw = {"compress": 432.0, "sources": [half_day_source], "tokens": half_day_source}
    for cv in (1.0, 4.0):
        gaps = np.diff(synthesize(1, 0.0, 50.0, 200.0, cv=cv, **kw)["arrival"].to_numpy())
        assert abs(gaps.std() / gaps.mean() - cv) < 0.25 * cv


def test_synth_from_committed_samples_and_servegen_rates():
    t = synthesize(5, 0.5, 10.0, 60.0, compress=1440.0,
                   sources=[SAMPLES / "servegen_language.parquet"])  # fmt: skip
    used = json.loads(workload_metadata(t)["synth"])["segments"]
    assert len({u["series"] for u in used}) == 5
    assert "Apache-2.0" in workload_metadata(t)[LICENSE]
    assert "CC-BY-4.0" in workload_metadata(t)[LICENSE]  # default token source: Azure conv


def test_synth_cli_names_models_from_a_registry(tmp_path):
    reg = tmp_path / "registry.yaml"
    Registry([ModelSpec(f"llama-{i}", "toy", 1000) for i in range(3)]).to_yaml(reg)
    out = tmp_path / "w.parquet"
    result = run("synth", "--alpha", 0.5, "--rps", 5, "--duration", 60, "--compress", 100,
                 "--registry", reg, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    w = read_workload(out)
    assert set(w["model"].to_pylist()) == {"llama-0", "llama-1", "llama-2"}
    assert workload_metadata(w)["command"].startswith("warmserve trace synth")
    bad = run("synth", "--models", 2, "--model-names", "a,b,c", "--alpha", 1, "--rps", 1,
              "--duration", 10, "--out", tmp_path / "x.parquet")  # fmt: skip
    assert bad.exit_code == 2 and "3 names" in bad.output
    assert not (tmp_path / "x.parquet").exists()


# --- stats ----------------------------------------------------------------------------------------


def test_window_load_matches_load_meter():
    rng = np.random.default_rng(5)
    n = 300
    arrival = np.sort(rng.uniform(0, 100, n)).round(1)  # rounding makes ties at edges likely
    models = [["a", "b"][i] for i in rng.integers(0, 2, n)]
    out = rng.integers(0, 300, n).astype(np.int32)
    w = table(arrival, models, np.zeros(n, np.int32), out)
    loads = stats.window_load(w, window=10.0, prefill_tps=1.0, tpot=0.1)
    end = arrival + out * 0.1
    meter = LoadMeter(window=10.0)
    events = sorted(
        [(t, 0, m) for t, m in zip(end, models, strict=True)]
        + [(t, 1, m) for t, m in zip(arrival, models, strict=True)]
    )
    for t, kind, m in events:
        (meter.arrive if kind else meter.depart)(m, t)
    horizon = (loads["window"].to_numpy().max() + 1) * 10.0
    expected = {(x.model, x.index): (x.avg, x.peak) for x in meter.close_until(horizon)}
    got = loads.to_pylist()
    assert len(got) == len(expected)
    for row in got:
        avg, peak = expected[(row["model"], row["window"])]
        assert row["avg"] == pytest.approx(avg, abs=1e-9) and row["peak"] == peak


def test_stats_cli_prints_models_and_writes_a_png(tmp_path):
    png = tmp_path / "load.png"
    result = run("stats", SAMPLES / "synth_demo.parquet", "--window", 60, "--png", png)
    assert result.exit_code == 0, result.output
    demo = read_workload(SAMPLES / "synth_demo.parquet")
    first = result.output.splitlines()[2].split()
    assert first[0] == "model-0"
    assert int(first[1]) == pc.sum(pc.equal(demo["model"], "model-0")).as_py()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_samples_are_valid_and_carry_provenance():
    for path in sorted(SAMPLES.glob("*.parquet")):
        meta = workload_metadata(pq.read_schema(path).empty_table())
        assert meta.get(LICENSE) and meta.get("command", "").startswith("warmserve trace"), path
        if not servegen.is_rate_series(path):
            assert read_workload(path).num_rows > 0
    assert sum(p.stat().st_size for p in SAMPLES.iterdir()) < 5 * 2**20


def test_sample_cli_draws_a_servegen_client_and_compresses_time(tmp_path):
    out = tmp_path / "s.parquet"
    rates = SAMPLES / "servegen_language.parquet"
    result = run("sample", rates, "--model", "m-large", "--client", 148, "--start", 600,
                 "--end", 1800, "--compress", 10, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    w = read_workload(out)
    assert set(w["model"].to_pylist()) == {"m-large/148"}
    arrival = w["arrival"].to_numpy()
    assert arrival.min() >= 0 and arrival.max() < 120  # 1,200 trace s / 10
    assert workload_metadata(w)[LICENSE].startswith("Apache-2.0")
    missing = run("sample", rates, "--model", "m-large", "--client", 9999, "--end", 600,
                  "--out", tmp_path / "x.parquet")  # fmt: skip
    assert missing.exit_code == 2 and "no client 9999" in missing.output
