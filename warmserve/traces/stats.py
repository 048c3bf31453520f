"""What a workload asks of a cluster: per-model counts and concurrent load per window.

A workload has arrivals but no completions, so concurrency needs a duration per request. It is
estimated as ``input_tokens / prefill_tps + output_tokens * tpot``: one uncontended request, with
defaults near a 7B model on one H100 (5,000 prompt tokens/s of prefill, 30 ms per output token).
Queueing under load would stretch real durations, so these figures are a lower bound on the
concurrency a cluster would see; they are meant for comparing workloads and windows, and they are
measured as :class:`warmserve.policy.load.LoadMeter` measures live load (time-weighted average
and peak of requests in flight per window), so the two can be set side by side.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PREFILL_TPS = 5000.0  # prompt tokens per second of prefill, for the duration estimate
TPOT = 0.03  # seconds per output token, for the duration estimate


def durations(table: pa.Table, prefill_tps: float = PREFILL_TPS, tpot: float = TPOT) -> np.ndarray:
    """Estimated seconds each request is in flight (see the module docstring)."""
    inp = table["input_tokens"].to_numpy().astype(np.float64)
    out = table["output_tokens"].to_numpy().astype(np.float64)
    return inp / prefill_tps + out * tpot


def _window_load(
    start: np.ndarray, end: np.ndarray, window: float, nwin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Time-weighted average and peak of requests in flight in each of ``nwin`` windows.

    The average integrates B(t) = sum over requests of the time each has been in flight by t,
    read at the window edges from sorted starts and ends with prefix sums. The peak takes the
    level after each event, ends before starts at equal times (a request that ends as another
    starts does not overlap it), and the level carried in at each window's start.
    """
    edges = np.arange(nwin + 1) * window
    a = np.sort(start)
    e = np.sort(end)

    def busy(t: np.ndarray) -> np.ndarray:
        na = np.searchsorted(a, t, side="left")
        ne = np.searchsorted(e, t, side="left")
        sa = np.concatenate(([0.0], np.cumsum(a)))[na]
        se = np.concatenate(([0.0], np.cumsum(e)))[ne]
        return (t * na - sa) - (t * ne - se)

    avg = np.diff(busy(edges)) / window

    times = np.concatenate((e, a))
    delta = np.concatenate((np.full(len(e), -1), np.ones(len(a), np.int64)))
    order = np.lexsort((delta, times))  # by time, then ends (-1) before starts (+1)
    level = np.cumsum(delta[order])
    win = np.minimum((times[order] // window).astype(np.int64), nwin - 1)
    carried = np.searchsorted(a, edges[:-1], "left") - np.searchsorted(e, edges[:-1], "left")
    peak = carried.astype(np.int64)
    np.maximum.at(peak, win, level)
    return avg, peak.astype(np.float64)


def window_load(
    table: pa.Table,
    window: float = 300.0,
    prefill_tps: float = PREFILL_TPS,
    tpot: float = TPOT,
) -> pa.Table:
    """Per (model, window): requests arriving, and average and peak concurrency.

    Windows start at 0 and run until the last estimated completion, empty ones included, so every
    model has the same windows.
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if table.num_rows == 0:
        raise ValueError("the workload has no requests")
    arrival = table["arrival"].to_numpy()
    end = arrival + durations(table, prefill_tps, tpot)
    nwin = int(end.max() // window) + 1 if len(end) else 0
    models = sorted(table["model"].unique().to_pylist())
    cols: dict[str, list] = {k: [] for k in ("model", "window", "requests", "avg", "peak")}
    for model in models:
        mask = pc.equal(table["model"], model).to_numpy(zero_copy_only=False)
        avg, peak = _window_load(arrival[mask], end[mask], window, nwin)
        counts = np.bincount((arrival[mask] // window).astype(np.int64), minlength=nwin)
        cols["model"].append(pa.array(np.full(nwin, model, dtype=object), pa.string()))
        cols["window"].append(np.arange(nwin))
        cols["requests"].append(counts[:nwin])
        cols["avg"].append(avg)
        cols["peak"].append(peak)
    return pa.table(
        {
            "model": pa.concat_arrays(cols["model"]),
            "window": np.concatenate(cols["window"]),
            "requests": np.concatenate(cols["requests"]),
            "avg": np.concatenate(cols["avg"]),
            "peak": np.concatenate(cols["peak"]),
        }
    )


def summary(table: pa.Table, loads: pa.Table) -> list[dict]:
    """One dict per model, most requests first: counts, rates, tokens and load over windows."""
    span = float(table["arrival"].to_numpy().max()) if table.num_rows else 0.0
    rows = []
    for model in sorted(loads["model"].unique().to_pylist()):
        mine = table.filter(pc.field("model") == model)
        load = loads.filter(pc.field("model") == model)
        rows.append(
            {
                "model": model,
                "requests": mine.num_rows,
                "share": mine.num_rows / table.num_rows,
                "rps": mine.num_rows / span if span > 0 else float("nan"),
                "input_tokens": pc.mean(mine["input_tokens"]).as_py(),
                "output_tokens": pc.mean(mine["output_tokens"]).as_py(),
                "avg_load": pc.mean(load["avg"]).as_py(),
                "peak_load": pc.max(load["peak"]).as_py(),
            }
        )
    return sorted(rows, key=lambda r: -r["requests"])


def plot(loads: pa.Table, window: float, path: str, title: str = "") -> None:
    """Average (solid) and peak (dotted) concurrency per window of each model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    models = sorted(loads["model"].unique().to_pylist())
    span = (loads["window"].to_numpy().max() + 1) * window
    unit, label = (3600.0, "hours") if span > 3 * 3600 else (60.0, "minutes")
    for i, model in enumerate(models):
        load = loads.filter(pc.field("model") == model)
        x = (load["window"].to_numpy() * window) / unit
        color = f"C{i % 10}"
        ax.plot(x, load["avg"].to_numpy(), color=color, label=model if len(models) <= 12 else None)
        ax.plot(x, load["peak"].to_numpy(), color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel(f"{label} from trace start")
    ax.set_ylabel(f"requests in flight per {window:g} s window")
    ax.set_title(title or "average (solid) and peak (dotted) concurrency")
    if len(models) <= 12:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
