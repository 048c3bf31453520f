"""ServeGen per-client rate series: conversion to Parquet and an arrival sampler.

ServeGen releases no per-request trace. Each client of each model has, per 600 s window, a mean
rate, the CV of its inter-arrival times and a fitted inter-arrival family (Gamma or Weibull with
shape and scale). That is the richest multi-day, multi-model signal we have, so it is kept as is
in a rate-series table (one row per client and window) rather than flattened into requests, and
:func:`sample_arrivals` draws requests from it on demand.

A per-model sum over clients (``client_id`` = :data:`AGGREGATE`) keeps the rate but not the
inter-arrival fit (a sum of renewal processes is not one); sampling it draws Poisson arrivals.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warmserve.traces.parse import read_csv_text, to_float, to_int
from warmserve.traces.schema import TraceError, write_table_atomic

WINDOW = 600.0  # seconds per ServeGen window
AGGREGATE = -1  # client_id of a row that sums all clients of a model
DISTS = ("Gamma", "Weibull")
_MAX_SAMPLES = 50_000_000  # refuse ranges whose expected count would not fit in memory

RATE_SCHEMA = pa.schema(
    [
        ("category", pa.string()),
        ("model", pa.string()),
        ("client_id", pa.int32()),
        ("window_start_s", pa.int64()),
        ("rate_rps", pa.float64()),
        ("cv", pa.float64()),
        ("dist", pa.string()),
        ("p1", pa.float64()),
        ("p2", pa.float64()),
    ]
)
_KEYS = [("category", "ascending"), ("model", "ascending"), ("client_id", "ascending")]
_ORDER = [*_KEYS, ("window_start_s", "ascending")]


def convert_servegen(path: str | os.PathLike) -> pa.Table:
    """The long ServeGen CSV (``servegen_client_windows_long.csv.gz``) -> a rate-series table."""
    names = ["category", "model", "client_id", "window_start_s", "rate_rps", "cv"]
    names += ["arrival_dist", "dist_param1", "dist_param2"]
    text = read_csv_text(path, names)
    rate = to_float(text["rate_rps"], path, "rate_rps")
    dist = text["arrival_dist"]
    known = pc.is_in(dist, pa.array(["", *DISTS])).to_numpy(zero_copy_only=False)
    if not known.all():
        row = int(np.argmin(known)) + 1
        msg = f"{dist[row - 1].as_py()!r} is not one of {DISTS} or empty"
        raise TraceError(path, msg, row=row, column="arrival_dist")
    empty = pc.equal(dist, "").to_numpy(zero_copy_only=False)
    p1 = to_float(text["dist_param1"], path, "dist_param1")
    p2 = to_float(text["dist_param2"], path, "dist_param2")
    unfitted = (rate > 0) & (empty | (p1 <= 0) | (p2 <= 0))
    if unfitted.any():
        row = int(np.argmax(unfitted)) + 1
        msg = "a window with requests needs a distribution with positive parameters"
        raise TraceError(path, msg, row=row, column="arrival_dist")
    table = pa.Table.from_arrays(
        [
            text["category"],
            text["model"],
            pa.array(to_int(text["client_id"], path, "client_id").astype(np.int32)),
            pa.array(to_int(text["window_start_s"], path, "window_start_s")),
            pa.array(rate),
            pa.array(to_float(text["cv"], path, "cv")),
            pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), dist),
            pa.array(p1),
            pa.array(p2),
        ],
        schema=RATE_SCHEMA,
    )
    return table.sort_by(_ORDER)


def aggregate(series: pa.Table) -> pa.Table:
    """One row per (category, model, window) with the summed rate of all clients."""
    clients = series.filter(pc.field("client_id") != AGGREGATE)
    sums = clients.group_by(["category", "model", "window_start_s"]).aggregate(
        [("rate_rps", "sum")]
    )
    n = sums.num_rows
    null = pa.nulls(n, pa.float64())
    table = pa.Table.from_arrays(
        [
            sums["category"],
            sums["model"],
            pa.array(np.full(n, AGGREGATE, np.int32)),
            sums["window_start_s"],
            sums["rate_rps_sum"],
            null,
            pa.nulls(n, pa.string()),
            null,
            null,
        ],
        schema=RATE_SCHEMA,
    )
    return table.sort_by(_ORDER)


def top_clients(series: pa.Table, k: int) -> pa.Table:
    """The rows of each model's ``k`` clients with the largest total rate."""
    clients = series.filter(pc.field("client_id") != AGGREGATE)
    totals = clients.group_by(["category", "model", "client_id"]).aggregate([("rate_rps", "sum")])
    totals = totals.sort_by([("rate_rps_sum", "descending"), *_KEYS])
    groups = totals.select(["category", "model"]).group_by(["category", "model"]).aggregate([])
    keep = pa.concat_tables(
        totals.filter((pc.field("category") == c) & (pc.field("model") == m)).slice(0, k)
        for c, m in zip(groups["category"].to_pylist(), groups["model"].to_pylist(), strict=True)
    )
    picked = clients.join(
        keep.select(["category", "model", "client_id"]), _names(_KEYS), join_type="inner"
    )
    return picked.select(RATE_SCHEMA.names).sort_by(_ORDER)


def _names(keys: list[tuple[str, str]]) -> list[str]:
    return [name for name, _ in keys]


def write_rates(table: pa.Table, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a rate-series table atomically, as workloads are written."""
    write_table_atomic(table.cast(RATE_SCHEMA), path, metadata)


def read_rates(path: str | os.PathLike) -> pa.Table:
    """Read a rate-series Parquet file, checking that it has the rate-series columns and types."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise TraceError(path, f"not a readable Parquet file: {e}") from None
    for field in RATE_SCHEMA:
        if field.name not in table.column_names:
            raise TraceError(path, "missing column", column=field.name)
        if table.schema.field(field.name).type != field.type:
            kind = table.schema.field(field.name).type
            raise TraceError(path, f"has type {kind}, expected {field.type}", column=field.name)
    return table


def is_rate_series(path: str | os.PathLike) -> bool:
    """Whether a Parquet file holds a rate series (as opposed to a per-request workload)."""
    return "rate_rps" in pq.read_schema(path).names


def sample_arrivals(
    series: pa.Table,
    model: str,
    client: int | None = None,
    start: float = 0.0,
    end: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Arrival times (trace seconds, sorted) of ``model``'s requests in ``[start, end)``.

    ``client`` picks one client; ``None`` is the whole model: the superposition of all its
    clients' arrivals, or Poisson arrivals at the summed rate if the table holds only the
    aggregate. In each window a client's inter-arrival times follow its fitted family with the
    fitted shape, and the scale rescaled so that the mean gap is ``1/rate`` (ServeGen's own
    recipe): the shape keeps the burstiness, the rate keeps the load. Each window starts a fresh
    renewal process at the window's start.
    """
    rng = rng if rng is not None else np.random.default_rng()
    rows = series.filter(pc.field("model") == model)
    if rows.num_rows == 0:
        raise ValueError(f"no rate series for model {model!r}")
    ids = rows["client_id"].to_numpy()
    if client is not None:
        rows = rows.filter(pc.field("client_id") == client)
        if rows.num_rows == 0:
            raise ValueError(f"model {model!r} has no client {client}")
    elif (ids != AGGREGATE).any():
        rows = rows.filter(pc.field("client_id") != AGGREGATE)
    w0 = rows["window_start_s"].to_numpy().astype(np.float64)
    rate = rows["rate_rps"].to_numpy()
    end = float(w0.max() + WINDOW) if end is None else float(end)
    live = (rate > 0) & (w0 < end) & (w0 + WINDOW > start)
    if rate[live].sum() * WINDOW > _MAX_SAMPLES:
        raise ValueError(f"{model!r} in [{start}, {end}) would draw over {_MAX_SAMPLES} requests")
    w0, rate = w0[live], rate[live]
    rows = rows.filter(pa.array(live))
    weibull = pc.equal(rows["dist"], "Weibull").fill_null(False).to_numpy(zero_copy_only=False)
    poisson = pc.is_null(rows["dist"]).to_numpy(zero_copy_only=False)
    shape = np.where(poisson, 1.0, rows["p1"].fill_null(1.0).to_numpy())
    # Scale that makes the mean gap 1/rate: Gamma mean = shape*scale, Weibull = scale*G(1+1/shape).
    mean_unit = shape.copy()
    if weibull.any():
        mean_unit[weibull] = np.frompyfunc(lambda c: math.gamma(1 + 1 / c), 1, 1)(
            shape[weibull]
        ).astype(np.float64)
    scale = 1.0 / (rate * mean_unit)
    idx, offset = _renewal_in_windows(rate, shape, scale, weibull, rng)
    times = np.sort(w0[idx] + offset)
    return times[(times >= start) & (times < end)]


def _renewal_in_windows(
    rate: np.ndarray,
    shape: np.ndarray,
    scale: np.ndarray,
    weibull: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Event offsets within ``[0, WINDOW)`` of one renewal process per window.

    Gaps are drawn for all unfinished windows at once, a few more than expected; the rare window
    whose gaps fall short of its end gets another round. Returns (window index, offset) arrays.
    """
    found_idx, found_off = [], []
    pending = np.arange(len(rate))
    clock = np.zeros(len(rate))
    while len(pending):
        expect = rate[pending] * WINDOW
        counts = np.ceil(expect * 1.2 + 4 * np.sqrt(expect) + 8).astype(np.int64)
        seg = np.repeat(np.arange(len(pending)), counts)
        k = shape[pending][seg]
        is_weibull = weibull[pending][seg]
        gaps = np.empty(len(seg))
        gaps[is_weibull] = rng.weibull(k[is_weibull])
        gaps[~is_weibull] = rng.gamma(k[~is_weibull])
        gaps *= scale[pending][seg]
        ends = np.cumsum(counts)
        total = np.cumsum(gaps)
        before = np.concatenate(([0.0], total[ends[:-1] - 1]))
        t = total - np.repeat(before - clock[pending], counts)
        inside = t < WINDOW
        found_idx.append(pending[seg[inside]])
        found_off.append(t[inside])
        last = t[ends - 1]
        clock[pending] = last
        pending = pending[last < WINDOW]
    if not found_idx:
        return np.empty(0, np.int64), np.empty(0)
    return np.concatenate(found_idx), np.concatenate(found_off)
