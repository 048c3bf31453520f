"""Read a model's safetensors file into host memory as tensors, and say how big it is.

The weight store's host tier calls :func:`load_weights`; engines then switch to a model from those
tensors without touching the disk again. The file format is simple enough (an 8-byte header length,
a JSON header, then raw little-endian data) that reading it directly lets the caller choose where
the bytes land: a region of the host memory pool, with one read and no intermediate copy.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import torch

WEIGHTS_FILE = "model.safetensors"

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lies in the data section of a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class WeightLayout:
    """The tensors of a safetensors file and where its data section begins."""

    path: str
    data_offset: int
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data: what a model occupies in host or device memory."""
        return max((e.end for e in self.entries), default=0)


def weights_file(model_path: str) -> str:
    """The safetensors file of a model folder (or the file itself if given one)."""
    return model_path if os.path.isfile(model_path) else os.path.join(model_path, WEIGHTS_FILE)


def read_layout(model_path: str) -> WeightLayout:
    """Parse the header of a model's safetensors file (reads only the header)."""
    path = weights_file(model_path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        start, end = info["data_offsets"]
        entries.append(TensorEntry(name, _DTYPES[info["dtype"]], tuple(info["shape"]), start, end))
    entries.sort(key=lambda e: e.start)
    return WeightLayout(path, 8 + header_len, tuple(entries))


def weights_nbytes(model_path: str) -> int:
    """Bytes of a model's weights, from the file header alone."""
    return read_layout(model_path).nbytes


def load_weights(model_path: str, into: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Read a model's weights into host memory and return them as tensors by name.

    ``into`` is a 1-D uint8 CPU tensor of at least ``weights_nbytes`` bytes (a region of the
    host memory pool); the data section is read straight into it and the returned tensors are
    views of it, so the caller owns where the weights live. Without ``into``, a fresh buffer is
    allocated. Either way the bytes are resident after the call, unlike an mmap of the file,
    whose pages the kernel may drop.
    """
    layout = read_layout(model_path)
    if into is None:
        into = torch.empty(layout.nbytes, dtype=torch.uint8)
    if into.dtype != torch.uint8 or into.dim() != 1 or into.numel() < layout.nbytes:
        raise ValueError(f"need a 1-D uint8 buffer of at least {layout.nbytes} bytes")
    view = memoryview(into.numpy()).cast("B")[: layout.nbytes]
    with open(layout.path, "rb", buffering=0) as f:
        f.seek(layout.data_offset)
        done = 0
        while done < layout.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{layout.path}: file ends before its header says")
            done += n
    return _views(into, layout)


def map_weights(model_path: str) -> dict[str, torch.Tensor]:
    """Tensors over a private memory map of the file: zero-copy, pages read on first touch.

    For callers that only read the weights once (an engine switching from disk) and want to skip
    the copy; the page cache, not the process, holds the bytes.
    """
    layout = read_layout(model_path)
    with open(layout.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(mapped, dtype=torch.uint8, offset=layout.data_offset)
    return _views(data, layout)


def _views(data: torch.Tensor, layout: WeightLayout) -> dict[str, torch.Tensor]:
    return {e.name: data[e.start : e.end].view(e.dtype).view(e.shape) for e in layout.entries}
