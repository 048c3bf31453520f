"""The one Parquet workload schema that every trace is converted to, and its reader and writer.

A workload is one row per request: ``arrival`` (float64 seconds from the trace's start, sorted),
``model`` (string), ``input_tokens`` and ``output_tokens`` (int32, not negative). Where the rows
came from (source file, its sha256 prefix, the command, the license) travels in the file's
key-value metadata, so a result can always be traced back to the public data behind it.

The simulator, the replay client and the forecast evaluation call :func:`read_workload` and
:func:`write_workload`; their signatures are a contract. Both validate, so a bad file fails at the
door with the file, row and column named, not deep inside an event loop.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("arrival", pa.float64(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("input_tokens", pa.int32(), nullable=False),
        pa.field("output_tokens", pa.int32(), nullable=False),
    ]
)

# Keys of the provenance metadata; values are plain strings.
SOURCE, SHA256, COMMAND, LICENSE = "source", "sha256", "command", "license"

_STRING_TYPES = (pa.string(), pa.large_string())


class TraceError(ValueError):
    """A trace or workload file is malformed.

    ``row`` is the 1-based data row (the header, if any, is not counted) and ``column`` the column
    name, when the fault has a place; the message names the file, row and column.
    """

    def __init__(
        self, path: str | os.PathLike, message: str, row: int | None = None, column: str = ""
    ) -> None:
        self.path = os.fspath(path)
        self.row = row
        self.column = column
        where = [self.path]
        if row is not None:
            where.append(f"row {row}")
        if column:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")


def sha256_prefix(path: str | os.PathLike, digits: int = 16) -> str:
    """The first ``digits`` hex digits of the file's sha256, as SOURCES.md lists them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:digits]


def provenance(source: str | os.PathLike, command: str, license: str) -> dict[str, str]:
    """Provenance metadata for a workload derived from the file ``source``."""
    return {
        SOURCE: os.path.basename(source),
        SHA256: sha256_prefix(source),
        COMMAND: command,
        LICENSE: license,
    }


def _first(mask: np.ndarray) -> int:
    """1-based row of the first True in ``mask``."""
    return int(np.argmax(mask)) + 1


def validate(table: pa.Table, path: str | os.PathLike) -> pa.Table:
    """Check ``table`` against the schema and return it with exactly the schema's types.

    ``large_string`` and dictionary-encoded model names are accepted and cast to ``string``
    (Parquet writers differ in which they produce); any other type mismatch is an error, because a
    silent cast (float token counts, integer arrivals in ms) usually hides a unit mistake.
    Columns beyond the schema's are kept, after the schema's four.
    """
    columns = []
    for field in SCHEMA:
        if field.name not in table.column_names:
            raise TraceError(path, "missing column", column=field.name)
        col = table.column(field.name)
        kind = col.type
        if field.name == "model" and pa.types.is_dictionary(kind):
            kind = kind.value_type
        if kind != field.type and not (field.name == "model" and kind in _STRING_TYPES):
            raise TraceError(path, f"has type {col.type}, expected {field.type}", column=field.name)
        if col.null_count:
            row = _first(np.asarray(col.is_null().to_numpy(zero_copy_only=False)))
            raise TraceError(path, "is null", row=row, column=field.name)
        columns.append(col.cast(field.type) if col.type != field.type else col)

    arrival = columns[0].to_numpy()
    if not np.isfinite(arrival).all():
        raise TraceError(path, "is not finite", row=_first(~np.isfinite(arrival)), column="arrival")
    if (arrival < 0).any():
        raise TraceError(path, "is negative", row=_first(arrival < 0), column="arrival")
    back = np.diff(arrival) < 0
    if back.any():
        row = _first(back) + 1
        raise TraceError(path, "is not sorted (earlier than the row before)", row, "arrival")
    for col, name in zip(columns[2:], ("input_tokens", "output_tokens"), strict=True):
        values = col.to_numpy()
        if (values < 0).any():
            raise TraceError(path, "is negative", row=_first(values < 0), column=name)

    out = pa.Table.from_arrays(columns, schema=SCHEMA)
    for name in table.column_names:
        if name not in SCHEMA.names:
            out = out.append_column(table.schema.field(name), table.column(name))
    return out.replace_schema_metadata(table.schema.metadata)


def read_workload(path: str | os.PathLike) -> pa.Table:
    """Read and validate a workload Parquet file.

    Returns a table whose first four columns have exactly :data:`SCHEMA`'s types; the file's
    key-value metadata stays on ``table.schema.metadata`` (see :func:`workload_metadata`).
    Raises :class:`TraceError` naming the file, row (1-based) and column of the first fault.
    """
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise TraceError(path, "no such file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise TraceError(path, f"not a readable Parquet file: {e}") from None
    return validate(table, path)


def workload_metadata(table: pa.Table) -> dict[str, str]:
    """The table's key-value metadata as text (provenance and whatever else the writer added)."""
    meta = table.schema.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:")}


def write_workload(
    table: pa.Table, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Validate ``table`` and write it to ``path`` atomically, with ``metadata`` attached.

    The file appears complete or not at all: rows go to a temporary file in the same folder,
    which then replaces ``path`` (``os.replace``), so a reader never sees half a workload and an
    error leaves nothing behind. ``metadata`` is merged over the table's own key-value metadata
    (use :func:`provenance` for the standard keys).
    """
    table = validate(table, path)
    write_table_atomic(table, path, metadata)


def write_table_atomic(
    table: pa.Table, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``table`` to ``path`` (Parquet) via a temporary file and ``os.replace``.

    ``metadata`` is merged over the table's own key-value metadata. On any error the temporary
    file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    meta = workload_metadata(table)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    table = table.replace_schema_metadata(meta)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a workload is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
