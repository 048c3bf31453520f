"""The result schema: one row per request, written by ``warmserve simulate`` and
``warmserve replay`` alike, so one report reads both.

Times are seconds. ``arrival`` is when the request was due (workload time, from the start of the
run); ``ttft`` counts from ``arrival``, so queueing, cold starts and a client that fell behind all
count against the system. Columns:

============== ======= ====== =============================================================
column         type    who    meaning
============== ======= ====== =============================================================
model          string  both   model the request named
arrival        float64 both   due time of the request
sent           float64 replay when the client actually sent it
start          float64 sim    when an instance admitted it (NaN if never)
first_token    float64 sim    time of its first output token
finish         float64 sim    time of its last output token, or when it was dropped
ttft           float64 both   first token - arrival (NaN unless status is ok)
tpot           float64 both   mean time per output token after the first (NaN if < 2 tokens)
latency        float64 replay last token - arrival
input_tokens   int32   sim    prompt tokens
output_tokens  int32   both   output tokens generated
http_status    int32   replay HTTP status of the response (0 if none)
status         string  both   ``ok``; ``dropped`` (sim: queue full, timed out, never served);
                              ``rejected`` (HTTP 429/503); ``error``
error          string  both   why it was not ok ("" when ok)
tier           string  sim    warmth tier the serving instance started from
                              (``disk``, ``host``, ``device``, ``engine``, ``active``)
============== ======= ====== =============================================================

``REQUIRED`` columns must be present in every result file; the others are optional. The schema's
key-value metadata carries ``policy`` (and for the simulator ``cluster``, ``workload``,
``seed``); the report labels a file by ``policy`` when present.

The simulator also writes a device timeline beside the results (``R.devices.parquet`` for
``R.parquet``), one row per change of a device's state, in ``DEVICE_SCHEMA``: from ``time`` on,
until the device's next row, the device is in ``mode`` with those bytes held. The report derives
GPU-seconds from it.
"""

from __future__ import annotations

import os

import pyarrow as pa

RESULT_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("arrival", pa.float64()),
        ("sent", pa.float64()),
        ("start", pa.float64()),
        ("first_token", pa.float64()),
        ("finish", pa.float64()),
        ("ttft", pa.float64()),
        ("tpot", pa.float64()),
        ("latency", pa.float64()),
        ("input_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("http_status", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("tier", pa.string()),
    ]
)

REQUIRED = ("model", "arrival", "ttft", "tpot", "output_tokens", "status", "error")

STATUSES = ("ok", "dropped", "rejected", "error")

DEVICE_SCHEMA = pa.schema(
    [
        ("time", pa.float64()),
        ("device", pa.string()),
        ("node", pa.string()),
        ("mode", pa.string()),  # idle, universal, dedicated (warmserve.policy.state.DeviceMode)
        ("memory", pa.int64()),
        ("weights_bytes", pa.int64()),  # weights of instances and prewarmed models
        ("kv_bytes", pa.int64()),  # KV cache reserved by instances (less what is lent)
        ("lent_bytes", pa.int64()),  # KV space lent to prewarmed weights
        ("serving", pa.string()),  # models with an instance here, comma-separated
        ("resident", pa.string()),  # prewarmed models here, comma-separated
    ]
)


def devices_path(results_path: str | os.PathLike) -> str:
    """The device timeline beside ``results_path``: ``R.parquet`` -> ``R.devices.parquet``."""
    root, ext = os.path.splitext(os.fspath(results_path))
    return f"{root}.devices{ext or '.parquet'}"


def check_results(table: pa.Table, where: str = "results") -> None:
    """Fail with the missing columns if ``table`` is not a result file."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"{where}: not a result file, lacks columns {missing}")
