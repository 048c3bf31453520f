"""Time trace conversion, synthesis and ServeGen sampling; writes bench/results/traces.json.

Run from the repository root: ``python bench/traces_bench.py``. Each figure is the best of a few
repeats (the machine is shared, so the minimum is the least disturbed run); the median is kept
beside it. Synthesis of 1,000,000 requests is held against its 10 s target as a ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from warmserve.traces import convert, servegen
from warmserve.traces.schema import write_workload
from warmserve.traces.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
RAW = (REPO / ".." / "shared" / "traces" / "raw").resolve()
OUT = REPO / "bench" / "results" / "traces.json"
SYNTH_TARGET_S = 10.0
REPEATS = 3


def timed(fn: Callable[[], object], repeats: int = REPEATS) -> tuple[dict, object]:
    """Best and median wall seconds of ``fn`` over ``repeats`` runs, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}, result


def conversions(folder: str) -> dict[str, dict]:
    """Raw file -> validated Parquet on disk, per source (parse, convert, sort, write)."""
    jobs = {
        "azure_conv": ("azure_llm_2023/AzureLLMInferenceTrace_conv.csv", convert.convert_azure),
        "azure_code": ("azure_llm_2023/AzureLLMInferenceTrace_code.csv", convert.convert_azure),
        "burstgpt": ("burstgpt/BurstGPT_1_first7days.csv", convert.convert_burstgpt),
        "mooncake_conversation": ("mooncake/conversation_trace.jsonl", convert.convert_mooncake),
    }
    out = {}
    for name, (rel, fn) in jobs.items():
        target = os.path.join(folder, f"{name}.parquet")

        def job(rel=rel, fn=fn, target=target) -> pa.Table:
            table, meta = fn(RAW / rel)
            write_workload(table, target, meta)
            return table

        figures, table = timed(job)
        out[name] = {**figures, "rows": table.num_rows, "file": rel}

    src = RAW / "servegen" / "servegen_client_windows_long.csv.gz"
    target = os.path.join(folder, "servegen.parquet")

    def servegen_job() -> pa.Table:
        table = servegen.convert_servegen(src)
        servegen.write_rates(table, target, {})
        return table

    figures, table = timed(servegen_job, repeats=2)
    out["servegen_rates"] = {
        **figures,
        "rows": table.num_rows,
        "file": "servegen/servegen_client_windows_long.csv.gz",
    }
    return out


def synthesis() -> dict[str, dict]:
    """1,000,000 requests (20 models, 1,000 req/s for 1,000 s, a day compressed 86.4x)."""
    out = {}
    for label, cv in (("poisson", None), ("gamma_cv2", 2.0)):
        figures, table = timed(
            lambda cv=cv: synthesize(20, 0.5, 1000.0, 1000.0, cv=cv, seed=0, compress=86.4)
        )
        out[label] = {
            **figures,
            "requests": table.num_rows,
            "requests_per_s": round(table.num_rows / figures["best_s"]),
            "fraction_of_10s_target": round(figures["best_s"] / SYNTH_TARGET_S, 4),
        }
    return out


def sampling() -> dict:
    """ServeGen sampler: one day of m-large's client 148 (fitted Gamma/Weibull gaps)."""
    rates = servegen.read_rates(REPO / "traces" / "servegen_language.parquet")
    figures, times = timed(
        lambda: servegen.sample_arrivals(rates, "m-large", 148, 0, 86400, np.random.default_rng(0))
    )
    rate = round(len(times) / figures["best_s"])
    return {**figures, "requests": len(times), "requests_per_s": rate}


def main() -> None:
    if not RAW.is_dir():
        sys.exit(f"raw traces not found at {RAW}")
    with tempfile.TemporaryDirectory() as folder:
        conv = conversions(folder)
    result = {
        "command": "python bench/traces_bench.py",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "note": "2 cores shared with other engineers' jobs; figures are best of repeats",
        },
        "conversion": conv,
        "synthesis_1M": synthesis(),
        "servegen_sampling": sampling(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
