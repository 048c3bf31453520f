"""Reading raw trace files so that a bad value is reported by file, row and column.

pyarrow's own type conversion fails a whole column without saying where, so columns are read as
text and converted here: a vectorised pattern check finds the first bad row, then one cast
converts the column. Rows are 1-based data rows (a CSV header is not counted; in JSON Lines the
row is the line).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from warmserve.traces.schema import TraceError

_INT = r"^\s*[+-]?\d+\s*$"
_FLOAT = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_TIMESTAMP = r"^\s*\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,9})?\s*$"
_INT32_MAX = np.iinfo(np.int32).max


def read_csv_text(path: str | os.PathLike, columns: list[str]) -> pa.Table:
    """Read ``columns`` of a CSV (gzip if the name ends in .gz) as text, in file order.

    Single-threaded so that pyarrow reports the line of a row with the wrong number of fields.
    """
    bad: list[pcsv.InvalidRow] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=False),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.string()), strings_can_be_null=False
            ),
        )
    except FileNotFoundError:
        raise TraceError(path, "no such file") from None
    except pa.ArrowInvalid as e:
        if bad:
            row = bad[0].number - 1 if bad[0].number is not None else None
            msg = f"expected {bad[0].expected_columns} fields, found {bad[0].actual_columns}"
            raise TraceError(path, msg, row=row) from None
        if "Empty CSV file" in str(e):
            raise TraceError(path, "the file is empty") from None
        raise TraceError(path, f"not readable as CSV: {e}") from None
    for name in columns:
        if name not in table.column_names:
            raise TraceError(path, f"missing column (found {table.column_names})", column=name)
    if table.num_rows == 0:
        raise TraceError(path, "no data rows")
    return table.select(columns)


def _check(col: pa.ChunkedArray, pattern: str, what: str, path, name: str, first_row: int) -> None:
    ok = pc.match_substring_regex(col, pattern).to_numpy(zero_copy_only=False)
    if not ok.all():
        i = int(np.argmin(ok))
        value = col[i].as_py()
        raise TraceError(path, f"{value!r} is not {what}", row=first_row + i, column=name)


def to_int(col: pa.ChunkedArray, path, name: str, first_row: int = 1) -> np.ndarray:
    """Text column -> int64 array; non-negative and int32-sized, as token counts must be."""
    _check(col, _INT, "an integer", path, name, first_row)
    values = pc.cast(pc.utf8_trim_whitespace(col), pa.int64()).to_numpy()
    _check_range(values, path, name, first_row, upper=_INT32_MAX)
    return values


def to_float(col: pa.ChunkedArray, path, name: str, first_row: int = 1) -> np.ndarray:
    """Text column -> float64 array of finite, non-negative numbers."""
    _check(col, _FLOAT, "a finite number", path, name, first_row)
    values = pc.cast(pc.utf8_trim_whitespace(col), pa.float64()).to_numpy()
    _check_range(values, path, name, first_row)
    return values


def to_seconds(col: pa.ChunkedArray, path, name: str, first_row: int = 1) -> np.ndarray:
    """Text timestamps (``YYYY-MM-DD HH:MM:SS[.fffffff]``) -> int64 nanoseconds since the epoch."""
    _check(col, _TIMESTAMP, "a timestamp like 2023-11-16 18:15:46.68", path, name, first_row)
    stamps = pc.cast(pc.utf8_trim_whitespace(col), pa.timestamp("ns"))
    return stamps.cast(pa.int64()).to_numpy()


def _check_range(values: np.ndarray, path, name: str, first_row: int, upper=None) -> None:
    if (values < 0).any():
        i = int(np.argmax(values < 0))
        raise TraceError(path, f"{values[i]} is negative", row=first_row + i, column=name)
    if upper is not None and (values > upper).any():
        i = int(np.argmax(values > upper))
        raise TraceError(path, f"{values[i]} is too large", row=first_row + i, column=name)


def read_jsonl_ints(path: str | os.PathLike, fields: list[str]) -> dict[str, np.ndarray]:
    """Integer ``fields`` of a JSON Lines file, non-negative, one array per field.

    Other fields are skipped. When pyarrow rejects the file, the first bad line is found by
    bisection (parse ever shorter prefixes; a prefix that holds the bad line fails), which costs
    a few dozen parses instead of a Python loop over the lines.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TraceError(path, "no such file") from None
    if not data.strip():
        raise TraceError(path, "the file is empty")
    schema = pa.schema([(name, pa.int64()) for name in fields])
    options = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")

    def parse(chunk: bytes) -> pa.Table:
        return pjson.read_json(pa.BufferReader(chunk), parse_options=options)

    try:
        table = parse(data)
    except pa.ArrowInvalid:
        _raise_bad_line(path, data, fields, parse)
    if table.num_rows != data.rstrip(b"\n").count(b"\n") + 1:
        raise TraceError(path, "has blank lines; every line must hold one request")
    out = {}
    for name in fields:
        col = table.column(name)
        if col.null_count:
            row = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False))) + 1
            raise TraceError(path, "missing or null", row=row, column=name)
        out[name] = col.to_numpy()
        _check_range(out[name], path, name, 1, upper=None)
    return out


def _raise_bad_line(path, data: bytes, fields: list[str], parse) -> None:
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1
    if len(ends) == 0 or ends[-1] != len(data):
        ends = np.append(ends, len(data))
    good, bad = 0, len(ends)  # lines[:good] parse, lines[:bad] do not
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            parse(data[: ends[mid - 1]])
            good = mid
        except pa.ArrowInvalid:
            bad = mid
    line = data[ends[bad - 2] if bad > 1 else 0 : ends[bad - 1]]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(path, f"not valid JSON: {e.msg}", row=bad) from None
    if not isinstance(obj, dict):
        raise TraceError(path, "not a JSON object", row=bad)
    for name in fields:
        if name in obj and not isinstance(obj[name], int):
            raise TraceError(path, f"{obj[name]!r} is not an integer", row=bad, column=name)
    raise TraceError(path, "not readable as JSON Lines", row=bad)
