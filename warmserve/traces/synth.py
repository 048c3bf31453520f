"""Multi-model workloads synthesized from real arrival-rate curves and real token counts.

The paper's evaluation needs N models with Zipf-like popularity (model i gets a share of the
total rate proportional to ``(i+1)**-alpha``) whose loads rise and fall at different times, as
real models' do: that is what makes prewarming ahead of a burst worth anything. So each model's
rate curve is a different real *segment*: one day of one series of a source (another day of
BurstGPT, or another ServeGen client or model), scaled to the model's share. A compression factor
F plays F trace seconds in one replay second, so a day's periodicity fits in minutes of replay.

Arrivals come from the time-rescaling construction: a renewal process of unit mean rate (Poisson,
or Gamma gaps of a given CV for burstiness) in "operational time", mapped back through the
inverse of the cumulative rate. That is exact for a piecewise-constant rate and needs no loop
over requests, so a million requests take well under a second.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warmserve.traces.convert import model_column
from warmserve.traces.schema import (
    LICENSE,
    SCHEMA,
    SHA256,
    SOURCE,
    read_workload,
    sha256_prefix,
    workload_metadata,
)
from warmserve.traces.servegen import AGGREGATE, WINDOW, is_rate_series, read_rates

# The committed derived samples; defaults when no source is named (see traces/README.md).
SAMPLES = Path(__file__).resolve().parents[2] / "traces"
DEFAULT_SOURCES = (SAMPLES / "burstgpt.parquet",)
DEFAULT_TOKENS = SAMPLES / "azure_conv.parquet"

DAY = 86400.0
BIN = WINDOW  # seconds of trace time per rate bin, for per-request sources too


@dataclass(frozen=True, slots=True)
class Series:
    """One real rate curve: requests per second in consecutive ``BIN``-second bins."""

    name: str  # e.g. "burstgpt.parquet:ChatGPT" or "servegen_language_top.parquet:m-mid/36"
    rates: np.ndarray


@dataclass(frozen=True, slots=True)
class Segment:
    """The part of a series a model's load follows: from ``day`` on, for the synthetic span."""

    series: Series
    day: int


def popularity(n: int, alpha: float) -> np.ndarray:
    """Shares of the total rate: model i gets (i+1)^-alpha, normalised to sum to 1."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -float(alpha)
    return w / w.sum()


def load_series(path: str | os.PathLike) -> list[Series]:
    """The rate curves of a source file, in a stable order.

    A per-request workload gives one curve per model (its arrivals counted per bin); a ServeGen
    rate series gives one per (model, client), the per-model aggregate first.
    """
    label = os.path.basename(path)
    if is_rate_series(path):
        table = read_rates(path)
        out = []
        pairs = zip(table["model"].to_pylist(), table["client_id"].to_pylist(), strict=True)
        keys = sorted(set(pairs))
        for model, client in keys:
            rows = table.filter((pc.field("model") == model) & (pc.field("client_id") == client))
            rows = rows.sort_by("window_start_s")
            start = rows["window_start_s"].to_numpy()
            rates = np.zeros(int(start.max() // BIN) + 1)
            rates[(start // BIN).astype(np.int64)] = rows["rate_rps"].to_numpy()
            who = "all" if client == AGGREGATE else str(client)
            out.append(Series(f"{label}:{model}/{who}", rates))
        return out
    table = read_workload(path)
    arrival = table["arrival"].to_numpy()
    nbins = int(arrival.max() // BIN) + 1 if len(arrival) else 0
    out = []
    for model in sorted(set(table["model"].unique().to_pylist())):
        mask = pc.equal(table["model"], model).to_numpy(zero_copy_only=False)
        counts = np.bincount((arrival[mask] // BIN).astype(np.int64), minlength=nbins)
        out.append(Series(f"{label}:{model}", counts / BIN))
    return out


def _segments(series: list[Series], span: float) -> list[Segment]:
    """Every (series, start day) whose curve has load over ``span`` trace seconds.

    Ordered series first, then day, so consecutive models follow different series before any
    series is reused on another day.
    """
    days = max(math.ceil(len(s.rates) * BIN / DAY) for s in series)
    out = []
    for day in range(days):
        for s in series:
            if day * DAY < len(s.rates) * BIN and _rates(Segment(s, day), span, 1.0)[0].sum() > 0:
                out.append(Segment(s, day))
    return out


def _rates(seg: Segment, span: float, compress: float) -> tuple[np.ndarray, np.ndarray]:
    """Rate per bin and bin edges in replay seconds for ``span`` trace seconds of ``seg``.

    Past the end of its series the curve wraps around to the series' start.
    """
    nbins = math.ceil(span / BIN)
    first = int(seg.day * DAY // BIN)
    rates = seg.series.rates[(first + np.arange(nbins)) % len(seg.series.rates)]
    edges = np.minimum(np.arange(nbins + 1) * BIN, span) / compress
    return rates, edges


def _arrivals(
    rates: np.ndarray, edges: np.ndarray, cv: float | None, rng: np.random.Generator
) -> np.ndarray:
    """Arrival times of a renewal process whose rate follows ``rates`` on ``edges`` (replay s).

    Unit-mean gaps (exponential, or Gamma with shape 1/cv^2 when ``cv`` is given) are summed in
    operational time and mapped through the inverse cumulative rate.
    """
    cumulative = np.concatenate(([0.0], np.cumsum(rates * np.diff(edges))))
    total = cumulative[-1]
    shape = 1.0 if cv is None else 1.0 / cv**2
    spread = 1.0 if cv is None else cv
    draws, clock = [], 0.0
    while clock < total:
        n = math.ceil((total - clock) * 1.05 + 6 * spread * math.sqrt(total - clock) + 16)
        gaps = rng.gamma(shape, 1.0 / shape, n) if cv is not None else rng.exponential(1.0, n)
        u = clock + np.cumsum(gaps)
        draws.append(u[u < total])
        clock = u[-1]
    u = np.concatenate(draws) if draws else np.empty(0)
    return np.interp(u, cumulative, edges)


def synthesize(
    models: int | Sequence[str],
    alpha: float,
    rps: float,
    duration: float,
    *,
    cv: float | None = None,
    seed: int = 0,
    compress: float = 1.0,
    sources: Sequence[str | os.PathLike] | None = None,
    tokens: str | os.PathLike | None = None,
) -> pa.Table:
    """A workload of ``models`` over ``duration`` replay seconds at ``rps`` requests/s in total.

    ``models`` is a count (names ``model-0``...) or the names, most popular first. Model i
    follows segment i of the ``sources`` (per-request workloads or ServeGen rate series; default
    the committed BurstGPT sample), each scaled so that its mean over the run is its popularity
    share of ``rps``. ``cv`` makes inter-arrival gaps Gamma with that coefficient of variation
    (``None``: Poisson). ``compress`` is trace seconds per replay second. Token counts are
    (input, output) pairs drawn jointly from ``tokens`` (default: the Azure conv sample). The
    same arguments give the same table; provenance is in its metadata.
    """
    names = [f"model-{i}" for i in range(models)] if isinstance(models, int) else list(models)
    _check(names, alpha, rps, duration, cv, compress)
    rng = np.random.default_rng(seed)
    paths = [Path(p) for p in (sources or DEFAULT_SOURCES)]
    series = [s for p in paths for s in load_series(p)]
    span = duration * compress
    segments = _segments(series, span)
    if not segments:
        raise ValueError(f"the sources {[str(p) for p in paths]} have no load to follow")
    shares = popularity(len(names), alpha)

    arrivals, codes, used = [], [], []
    for i, share in enumerate(shares):
        seg = segments[i % len(segments)]
        rates, edges = _rates(seg, span, compress)
        mean = (rates * np.diff(edges)).sum() / duration
        t = _arrivals(rates * (rps * share / mean), edges, cv, rng)
        arrivals.append(t)
        codes.append(np.full(len(t), i, np.int32))
        used.append({"model": names[i], "share": float(share), "series": seg.series.name})
        used[-1]["day"] = seg.day
    arrival = np.concatenate(arrivals)
    order = np.argsort(arrival, kind="stable")
    code = np.concatenate(codes)[order]

    token_path = Path(tokens or DEFAULT_TOKENS)
    inp, out = draw_tokens(token_path, len(order), rng)
    table = pa.Table.from_arrays(
        [pa.array(arrival[order]), model_column(code, names), pa.array(inp), pa.array(out)],
        schema=SCHEMA,
    )
    meta = {
        SOURCE: ", ".join(p.name for p in [*paths, token_path]),
        SHA256: ", ".join(sha256_prefix(p) for p in [*paths, token_path]),
        LICENSE: _licenses([*paths, token_path]),
        "synth": json.dumps(
            {
                "alpha": alpha,
                "rps": rps,
                "duration": duration,
                "cv": cv,
                "seed": seed,
                "compress": compress,
                "tokens": token_path.name,
                "segments": used,
            }
        ),
    }
    return table.replace_schema_metadata(meta)


def draw_tokens(
    path: str | os.PathLike, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (input, output) token pairs drawn with replacement from a real workload.

    Pairs are drawn whole, so the correlation of prompt and answer lengths survives.
    """
    pool = read_workload(path)
    if pool.num_rows == 0:
        raise ValueError(f"{path}: no requests to draw token counts from")
    pick = rng.integers(0, pool.num_rows, n)
    return pool["input_tokens"].to_numpy()[pick], pool["output_tokens"].to_numpy()[pick]


def _check(
    names: list[str], alpha: float, rps: float, duration: float, cv: float | None, compress: float
) -> None:
    if not names:
        raise ValueError("need at least one model")
    if len(set(names)) != len(names):
        raise ValueError(f"model names repeat: {names}")
    for label, value in (("rps", rps), ("duration", duration), ("compress", compress)):
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{label} must be a positive number, got {value}")
    if cv is not None and not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"cv must be a positive number, got {cv}")
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")


def license_of(path: str | os.PathLike) -> str:
    """The license recorded in a derived Parquet file's metadata (the samples all carry one)."""
    meta = workload_metadata(pq.read_schema(path).empty_table())
    return meta.get(LICENSE, f"unknown (no license in {os.path.basename(path)})")


def _licenses(paths: list[Path]) -> str:
    """The distinct licenses of the source files, in order."""
    return " | ".join(dict.fromkeys(license_of(p) for p in paths))
