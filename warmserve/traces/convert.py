"""Converters from the raw public per-request traces to the workload schema.

Each converter returns a workload table (see :mod:`warmserve.traces.schema`) sorted by arrival
(stable, so requests with equal stamps keep their file order). Arrival times keep each trace's own
origin where it has a meaning: BurstGPT counts seconds from midnight of its first day, so the
diurnal phase survives; Mooncake counts from its first request. Azure stamps are wall-clock
datetimes; they become seconds after the first request, and the first stamp is kept in the
metadata under ``start``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warmserve.traces.parse import read_csv_text, read_jsonl_ints, to_int, to_seconds
from warmserve.traces.schema import SCHEMA, TraceError

FORMATS = ("azure", "burstgpt", "mooncake", "servegen")

LICENSES = {
    "azure": "CC-BY-4.0; Azure/AzurePublicDataset; cite Patel et al., Splitwise, ISCA 2024",
    "burstgpt": "CC-BY-4.0; HPMLL/BurstGPT; cite Wang et al., BurstGPT, KDD 2025",
    "mooncake": "Apache-2.0; kvcache-ai/Mooncake; cite Qin et al., Mooncake, FAST 2025",
    "servegen": "Apache-2.0; alibaba/ServeGen; cite Xiang et al., ServeGen, arXiv 2505.09999",
}

# The first line of each format, as the raw files have it; enough to tell them apart.
_HEADERS = {
    "azure": "TIMESTAMP,ContextTokens,GeneratedTokens",
    "burstgpt": "Timestamp,Model,Request tokens,Response tokens",
    "servegen": "category,model,client_id,window_start_s",
}


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of a raw trace from its first line (gzip is looked through)."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.readline(4096).decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        raise TraceError(path, "no such file") from None
    except (OSError, EOFError) as e:
        raise TraceError(path, f"cannot read: {e}") from None
    if not head:
        raise TraceError(path, "the file is empty")
    if head.startswith("{") and '"timestamp"' in head and '"input_length"' in head:
        return "mooncake"
    for fmt, header in _HEADERS.items():
        if head.startswith(header):
            return fmt
    raise TraceError(
        path, f"unknown trace format (first line {head[:80]!r}); pass --format {FORMATS}"
    )


def model_column(codes: np.ndarray, names: list[str]) -> pa.Array:
    """A string column from integer codes into ``names`` (built in C++, not per row)."""
    dictionary = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(names))
    return dictionary.cast(pa.string())


def workload_table(
    arrival: np.ndarray, model: pa.Array, input_tokens: np.ndarray, output_tokens: np.ndarray
) -> pa.Table:
    """A workload table from columns in any order; rows are sorted by arrival, stably."""
    order = np.argsort(arrival, kind="stable")
    return pa.Table.from_arrays(
        [
            pa.array(arrival[order], pa.float64()),
            model.take(pa.array(order)),
            pa.array(input_tokens[order].astype(np.int32)),
            pa.array(output_tokens[order].astype(np.int32)),
        ],
        schema=SCHEMA,
    )


def azure_model_name(path: str | os.PathLike) -> str:
    """``azure-conv`` / ``azure-code`` from the file name, as the two 2023 files are named."""
    stem = os.path.basename(os.fspath(path)).lower()
    for kind in ("conv", "code"):
        if kind in stem:
            return f"azure-{kind}"
    return "azure"


def convert_azure(path: str | os.PathLike, model: str | None = None) -> tuple[pa.Table, dict]:
    """Azure LLM inference trace 2023 CSV -> (workload, extra metadata)."""
    cols = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    text = read_csv_text(path, cols)
    ns = to_seconds(text["TIMESTAMP"], path, "TIMESTAMP")
    inp = to_int(text["ContextTokens"], path, "ContextTokens")
    out = to_int(text["GeneratedTokens"], path, "GeneratedTokens")
    start = int(ns.min())
    arrival = (ns - start) / 1e9
    name = model or azure_model_name(path)
    table = workload_table(arrival, model_column(np.zeros(len(ns), np.int32), [name]), inp, out)
    first = pa.scalar(start, pa.timestamp("ns")).as_py()
    return table, {"start": str(first)}


def convert_burstgpt(
    path: str | os.PathLike, model: str | None = None, drop_failures: bool = False
) -> tuple[pa.Table, dict]:
    """BurstGPT CSV -> (workload, extra metadata).

    Failed requests (``Response tokens`` = 0) are kept by default: they did arrive and did load
    the service, and the arrival process is what forecasting learns from. They keep 0 output
    tokens, so a replay sees them as requests that produce nothing. ``drop_failures`` removes them.
    """
    cols = ["Timestamp", "Model", "Request tokens", "Response tokens"]
    text = read_csv_text(path, cols)
    arrival = to_int(text["Timestamp"], path, "Timestamp").astype(np.float64)
    inp = to_int(text["Request tokens"], path, "Request tokens")
    out = to_int(text["Response tokens"], path, "Response tokens")
    models = text["Model"].combine_chunks()
    empty = np.asarray(pc.equal(pc.utf8_length(models), 0))
    if empty.any():
        raise TraceError(path, "empty model name", row=int(np.argmax(empty)) + 1, column="Model")
    if model is not None:
        models = model_column(np.zeros(len(arrival), np.int32), [model])
    keep = out > 0 if drop_failures else np.ones(len(out), bool)
    table = workload_table(arrival[keep], models.filter(pa.array(keep)), inp[keep], out[keep])
    return table, {"failures": "dropped" if drop_failures else "kept (output_tokens = 0)"}


def convert_mooncake(path: str | os.PathLike, model: str | None = None) -> tuple[pa.Table, dict]:
    """Mooncake JSON Lines (``timestamp`` in ms) -> (workload, extra metadata)."""
    cols = read_jsonl_ints(path, ["timestamp", "input_length", "output_length"])
    for name in ("input_length", "output_length"):
        big = cols[name] > np.iinfo(np.int32).max
        if big.any():
            raise TraceError(path, "is too large", row=int(np.argmax(big)) + 1, column=name)
    arrival = cols["timestamp"] / 1000.0
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0].removesuffix("_trace")
    name = model or f"mooncake-{stem}"
    codes = np.zeros(len(arrival), np.int32)
    table = workload_table(
        arrival, model_column(codes, [name]), cols["input_length"], cols["output_length"]
    )
    return table, {}
