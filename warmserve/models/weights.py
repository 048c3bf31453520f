"""Read a model's safetensors checkpoint into host memory as tensors, and say how big it is.

The weight store's host tier reads a checkpoint through :meth:`WeightLayout.read_into`; engines
then switch to a model from those tensors without touching the disk again. The file format is
simple enough (an 8-byte header length, a JSON header, then raw little-endian data) that reading it
directly lets the caller choose where the bytes land: a region of the host memory pool, with one
read and no intermediate copy.

A checkpoint is one file (``model.safetensors``) or several shards, as Hugging Face's
``save_pretrained`` writes a large model (``model-00001-of-00004.safetensors``, ... and
``model.safetensors.index.json`` naming the shard of each tensor). Either way the weights occupy
one flat buffer: the shards' data sections one after another, so the rest of WarmServe (host
copies, device regions, byte accounting) sees one block of bytes per model.
"""

from __future__ import annotations

import errno
import glob
import json
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

WEIGHTS_FILE = "model.safetensors"  # the file of a checkpoint in one piece
INDEX_FILE = "model.safetensors.index.json"  # names the shard of each tensor of a sharded one
# Where each shard starts in the flat buffer is rounded up to this, so tensors of the widest dtype
# stay aligned when the shard before ends on an odd byte.
SHARD_ALIGN = 8

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint's files contradict each other or hold what this module cannot read."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lies in the flat buffer of a checkpoint's weights."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Shard:
    """One safetensors file: where its data section begins in the file, and lands in the buffer."""

    path: str
    data_offset: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class WeightLayout:
    """A checkpoint's tensors in one flat buffer, and which file each range of it comes from."""

    shards: tuple[Shard, ...]
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data: what a model occupies in host or device memory."""
        return self.shards[-1].end

    def views(self, data: torch.Tensor, shard: Shard | None = None) -> dict[str, torch.Tensor]:
        """Named tensors over ``data`` (no copy): a uint8 buffer laid out as this layout, or as
        the data section of one ``shard`` alone (a file mapped as it is on disk)."""
        lo, hi = (0, self.nbytes) if shard is None else (shard.start, shard.end)
        return {
            e.name: data[e.start - lo : e.end - lo].view(e.dtype).view(e.shape)
            for e in self.entries
            if lo <= e.start and e.end <= hi
        }

    def read_into(
        self,
        buffer: memoryview,
        before_slice: Callable[[], None] = lambda: None,
        slice_bytes: int = 1 << 30,
    ) -> None:
        """Read every shard's data section into its place in ``buffer`` (``nbytes`` or more).

        ``before_slice`` runs before each read of at most ``slice_bytes``: the weight store raises
        from it to stop the copy of a large model midway when its prewarm is cancelled.
        """
        for shard in self.shards:
            with open(shard.path, "rb", buffering=0) as f:
                f.seek(shard.data_offset)
                done = shard.start
                while done < shard.end:
                    before_slice()
                    n = f.readinto(buffer[done : min(shard.end, done + slice_bytes)])
                    if not n:
                        raise OSError(f"{shard.path}: file ends before its header says")
                    done += n


def weights_files(model_path: str) -> tuple[str, ...]:
    """The safetensors files of a model folder (or the file itself if given one), in order.

    With an index, the files it names: a folder may hold others the loader must skip (Mistral's
    repos ship ``consolidated.safetensors`` beside the shards). Without one, every
    ``*.safetensors`` in the folder. vLLM chooses the same way, so the host tier holds exactly
    what an engine would read from disk.
    """
    if os.path.isfile(model_path):
        return (model_path,)
    index = os.path.join(model_path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shard_names = set(json.load(f)["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        files = tuple(os.path.join(model_path, name) for name in sorted(shard_names))
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(errno.ENOENT, f"shard named in {index} is missing", path)
        return files
    files = tuple(sorted(glob.glob(os.path.join(glob.escape(model_path), "*.safetensors"))))
    if not files:
        raise FileNotFoundError(errno.ENOENT, "no *.safetensors weights", model_path)
    return files


def read_layout(model_path: str) -> WeightLayout:
    """Parse the headers of a model's safetensors files (reads only the headers)."""
    shards: list[Shard] = []
    entries: list[TensorEntry] = []
    found_in: dict[str, str] = {}  # tensor name -> the file that holds it
    end = 0
    for path in weights_files(model_path):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        start = -(-end // SHARD_ALIGN) * SHARD_ALIGN
        end = start
        for name, info in header.items():
            if name in found_in:
                raise CheckpointError(f"{path}: tensor {name!r} is also in {found_in[name]}")
            found_in[name] = path
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}; known: {sorted(_DTYPES)}"
                )
            lo, hi = info["data_offsets"]
            entries.append(TensorEntry(name, dtype, tuple(info["shape"]), start + lo, start + hi))
            end = max(end, start + hi)
        shards.append(Shard(path, 8 + header_len, start, end))
    entries.sort(key=lambda e: e.start)
    return WeightLayout(tuple(shards), tuple(entries))


def weights_nbytes(model_path: str) -> int:
    """Bytes of a model's weights, from the file headers alone."""
    return read_layout(model_path).nbytes


def load_weights(model_path: str, into: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Read a model's weights into host memory and return them as tensors by name.

    ``into`` is a 1-D uint8 CPU tensor of at least ``weights_nbytes`` bytes (a region of the
    host memory pool); the data sections are read straight into it and the returned tensors are
    views of it, so the caller owns where the weights live. Without ``into``, a fresh buffer is
    allocated. Either way the bytes are resident after the call, unlike an mmap of the files,
    whose pages the kernel may drop.
    """
    layout = read_layout(model_path)
    if into is None:
        into = torch.empty(layout.nbytes, dtype=torch.uint8)
    if into.dtype != torch.uint8 or into.dim() != 1 or into.numel() < layout.nbytes:
        raise ValueError(f"need a 1-D uint8 buffer of at least {layout.nbytes} bytes")
    layout.read_into(memoryview(into.numpy()).cast("B"))
    return layout.views(into)


def map_weights(model_path: str) -> dict[str, torch.Tensor]:
    """Tensors over private memory maps of the files: zero-copy, pages read on first touch.

    For callers that only read the weights once (an engine switching from disk) and want to skip
    the copy; the page cache, not the process, holds the bytes.
    """
    layout = read_layout(model_path)
    tensors = {}
    for shard in layout.shards:
        with open(shard.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        data = torch.frombuffer(mapped, dtype=torch.uint8, offset=shard.data_offset)
        tensors.update(layout.views(data, shard))
    return tensors
