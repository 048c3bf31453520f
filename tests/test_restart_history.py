"""A restarted scheduler forecasts as before: the forecaster's history is kept on disk.

Real schedulers (``--preload warmserve.scheduler_plugin``) in this process, one after the other on
the same history directory; load windows are fed through the extension's own meter and planning
pass, as live requests would feed them.
"""

from __future__ import annotations

import asyncio
import math
import os

import dask.config
import numpy as np
import pyarrow.parquet as pq
from distributed import Scheduler
from distributed.metrics import time

from warmserve.registry import ModelSpec, Registry
from warmserve.scheduler_plugin import history
from warmserve.scheduler_plugin.extension import NAME, WarmServeExtension

MODELS = Registry([ModelSpec(f"m{i}", "f", 1000) for i in range(3)])
WINDOW = 300.0


async def _scheduler(registry_file: str) -> Scheduler:
    return await Scheduler(
        host="127.0.0.1",
        port=0,
        dashboard_address=":0",
        preload=["warmserve.scheduler_plugin"],
        preload_argv=[["--warmserve-registry", registry_file]],
    )


def _feed(ext: WarmServeExtension, windows: int, seed: int) -> None:
    """Requests of every model over the last ``windows`` closed windows, a few per window."""
    rng = np.random.default_rng(seed)
    start = (math.floor(time() / WINDOW) - windows) * WINDOW
    for k in range(windows):
        for i, model in enumerate(MODELS):
            t = start + k * WINDOW
            for _ in range(int(rng.integers(0, 6 + 3 * i))):
                a = t + rng.uniform(0, WINDOW / 2)
                ext.meter.arrive(model, a)
                ext.meter.depart(model, a + rng.uniform(1, WINDOW / 2))


def _forecasts(ext: WarmServeExtension) -> dict[str, tuple[float, float]]:
    window = math.floor(time() / WINDOW)
    out = {}
    for w in (window, window + 1, window + 5):
        out |= {f"{m}@{w - window}": v for m, v in ext.policy.forecaster.predict_model(w).items()}
    return out


def test_forecasts_continue_after_a_scheduler_restart(tmp_path):
    registry_file = os.fspath(tmp_path / "registry.yaml")
    MODELS.to_yaml(registry_file)
    history_dir = tmp_path / "history"

    async def first() -> dict:
        async with await _scheduler(registry_file) as s:
            ext = s.extensions[NAME]
            assert ext.history is not None and ext.history.load() == 0
            _feed(ext, windows=40, seed=1)
            await ext.run_once()  # closes and observes the windows, then saves
            assert os.path.exists(history_dir / history.FILE)
            return _forecasts(ext)

    async def second() -> tuple[dict, dict]:
        async with await _scheduler(registry_file) as s:
            restored = _forecasts(s.extensions[NAME])
        with dask.config.set({"warmserve.scheduler.history-dir": None}):
            async with await _scheduler(registry_file) as s:
                fresh = _forecasts(s.extensions[NAME])
        return restored, fresh

    with dask.config.set(
        {"warmserve.scheduler.history-dir": os.fspath(history_dir), "warmserve.planner.tick": 60}
    ):
        before = asyncio.run(first())
        restored, fresh = asyncio.run(second())
    assert restored == before
    assert fresh != before  # the history is what carries the forecasts over
    table = pq.read_table(history_dir / history.FILE)
    assert table.column("model").to_pylist() == list(MODELS)


def test_history_written_under_other_parameters_or_broken_is_ignored(tmp_path):
    registry_file = os.fspath(tmp_path / "registry.yaml")
    MODELS.to_yaml(registry_file)

    async def run(window: float, feed: bool) -> int:
        with dask.config.set(
            {
                "warmserve.scheduler.history-dir": os.fspath(tmp_path / "history"),
                "warmserve.forecast.window": window,
                "warmserve.planner.tick": 60,
            }
        ):
            async with await _scheduler(registry_file) as s:
                ext = s.extensions[NAME]
                if feed:
                    ext.policy.observe("m0", 1, 2.0, 3.0)
                return ext.history.load()

    assert asyncio.run(run(WINDOW, feed=True)) == 0  # nothing yet; saved on close
    assert asyncio.run(run(WINDOW, feed=False)) == len(MODELS)
    assert asyncio.run(run(WINDOW / 2, feed=False)) == 0  # other windows: not misread
    (tmp_path / "history" / history.FILE).write_bytes(b"not parquet")
    assert asyncio.run(run(WINDOW, feed=False)) == 0  # a broken file: the scheduler starts
