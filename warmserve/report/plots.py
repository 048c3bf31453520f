"""PNG figures of a report: TTFT CDF per result file, device modes over time."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa

_MODES = ("dedicated", "universal", "idle")


def ttft_cdf(tables: dict[str, pa.Table], path: str, slo_ttft: float | None = None) -> None:
    """One CDF line per labelled result table; dropped requests sit at the top (never reached)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, table in tables.items():
        ttft = table.column("ttft").to_numpy(zero_copy_only=False).astype(np.float64)
        ok = np.sort(ttft[np.isfinite(ttft)])
        if not len(ok):
            continue
        frac = np.arange(1, len(ok) + 1) / len(ttft)
        ax.step(ok, frac, where="post", label=label)
    if slo_ttft is not None:
        ax.axvline(slo_ttft, color="grey", linestyle=":", label=f"SLO {slo_ttft:g} s")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_modes(devices: pa.Table, path: str, title: str = "", points: int = 2000) -> None:
    """How many devices are dedicated, universal and idle over time (stacked)."""
    t = devices.column("time").to_numpy(zero_copy_only=False).astype(np.float64)
    dev = np.asarray(devices.column("device").to_pylist(), dtype=object)
    mode = np.asarray(devices.column("mode").to_pylist(), dtype=object)
    grid = np.linspace(0.0, float(t.max()) if len(t) else 1.0, points)
    counts = {m: np.zeros(points) for m in _MODES}
    for d in np.unique(dev):
        sel = dev == d
        dt, dm = t[sel], mode[sel]
        order = np.argsort(dt, kind="stable")
        dt, dm = dt[order], dm[order]
        at = np.searchsorted(dt, grid, side="right") - 1
        seen = at >= 0
        for m in _MODES:
            counts[m][seen] += dm[at[seen]] == m
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.stackplot(grid, *(counts[m] for m in _MODES), labels=_MODES, step="post")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("devices")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_forecast(
    models: list[str],
    window: float,
    avg: np.ndarray,
    peak: np.ndarray,
    forecast_peak: np.ndarray,
    path: str,
    title: str = "",
) -> None:
    """Per-model load over time (average and peak concurrency per window) with the forecast
    peak beside it, one panel per model."""
    cols = 2 if len(models) > 1 else 1
    rows = max(1, -(-len(models) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 2.2 * rows), squeeze=False)
    x = window * np.arange(avg.shape[1] if avg.ndim == 2 else 0)
    for i, (ax, model) in enumerate(zip(axes.flat, models, strict=False)):
        ax.step(x, avg[i], where="post", lw=0.9, label="average")
        ax.step(x, peak[i], where="post", lw=0.9, label="peak")
        ax.step(x, forecast_peak[i], where="post", lw=1.3, ls="--", label="forecast peak")
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("in flight")
    for ax in axes.flat[len(models) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(f"time (s), windows of {window:g} s")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
