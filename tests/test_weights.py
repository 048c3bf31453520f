"""Sharded checkpoints, as Hugging Face's ``save_pretrained`` writes them, read like one file.

The shards are split by ``huggingface_hub.split_torch_state_dict_into_shards``, the function
``save_pretrained`` itself calls, and written with ``safetensors.torch.save_file``; the same
tensors saved as one ``model.safetensors`` are what every reader must agree with.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import threading

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from warmserve.engine.engine import Engine
from warmserve.models.make import make_family
from warmserve.models.weights import (
    INDEX_FILE,
    SHARD_ALIGN,
    WEIGHTS_FILE,
    CheckpointError,
    load_weights,
    map_weights,
    read_layout,
    weights_nbytes,
)
from warmserve.protocol import GenerateRequest
from warmserve.registry import ModelSpec
from warmserve.worker_plugin.devices import Device
from warmserve.worker_plugin.errors import Cancelled
from warmserve.worker_plugin.weight_store import HostTier, WeightStore

MiB = 1 << 20


def save_sharded(tensors: dict[str, torch.Tensor], folder: str, max_shard_size: int) -> list[str]:
    """Write ``tensors`` as ``save_pretrained`` does: shards plus an index; return shard names."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    assert split.is_sharded
    os.makedirs(folder, exist_ok=True)
    for name, names in split.filename_to_tensors.items():
        shard = {n: tensors[n].contiguous() for n in names}
        save_file(shard, os.path.join(folder, name), {"format": "pt"})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return sorted(split.filename_to_tensors)


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes; the odd-length bool ends the second shard on an odd byte, so the int64 of
    the third one is only aligned if the layout rounds the shard's start up."""
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=gen).to(torch.bfloat16),
        "a.mask": torch.rand(7, generator=gen) > 0.5,
        "b.weight": torch.randn(48, 32, generator=gen),
        "b.steps": torch.arange(5, dtype=torch.int64),
        "c.weight": torch.randn(16, 16, generator=gen).to(torch.float16),
    }


@pytest.fixture
def single(tmp_path, tensors) -> str:
    path = os.fspath(tmp_path / "single")
    os.makedirs(path)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), {"format": "pt"})
    return path


@pytest.fixture
def sharded(tmp_path, tensors) -> str:
    path = os.fspath(tmp_path / "sharded")
    assert len(save_sharded(tensors, path, max_shard_size=4103)) == 3
    return path


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_sharded_layout_is_the_shards_in_order(sharded: str, tensors) -> None:
    layout = read_layout(sharded)
    assert [os.path.basename(s.path) for s in layout.shards] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert layout.shards[1].end % 2 == 1
    for before, shard in itertools.pairwise(layout.shards):
        assert shard.start == -(-before.end // SHARD_ALIGN) * SHARD_ALIGN
    assert layout.shards[0].start == 0 and layout.nbytes == layout.shards[-1].end
    assert sum(s.end - s.start for s in layout.shards) == sum(t.nbytes for t in tensors.values())
    assert weights_nbytes(sharded) == layout.nbytes
    assert sorted(e.name for e in layout.entries) == sorted(tensors)


def test_sharded_reads_as_the_single_file(single: str, sharded: str, tensors) -> None:
    assert_same(load_file(os.path.join(single, WEIGHTS_FILE)), tensors)
    for path in (single, sharded):
        pool = torch.zeros(weights_nbytes(path) + 64, dtype=torch.uint8)
        into = load_weights(path, into=pool)
        for got in (into, load_weights(path), map_weights(path)):
            assert_same(got, tensors)
        assert all(t.untyped_storage().data_ptr() == pool.data_ptr() for t in into.values())
    assert read_layout(single).nbytes == sum(t.nbytes for t in tensors.values())


def test_without_an_index_every_safetensors_file_is_a_shard(sharded: str, tensors) -> None:
    os.remove(os.path.join(sharded, INDEX_FILE))
    assert len(read_layout(sharded).shards) == 3
    assert_same(load_weights(sharded), tensors)


def test_the_index_decides_which_files_are_shards(sharded: str, single: str, tensors) -> None:
    """Mistral's repos hold ``consolidated.safetensors`` beside the shards: the same tensors
    again, which only the index tells apart."""
    consolidated = os.path.join(sharded, "consolidated.safetensors")
    shutil.copy(os.path.join(single, WEIGHTS_FILE), consolidated)
    assert len(read_layout(sharded).shards) == 3
    assert_same(load_weights(sharded), tensors)
    os.remove(os.path.join(sharded, INDEX_FILE))
    with pytest.raises(CheckpointError, match=r"is also in .*consolidated\.safetensors"):
        read_layout(sharded)


def test_host_tier_fills_the_same_bytes(sharded: str, tensors) -> None:
    host = HostTier(16 * MiB)
    try:
        copy = host.reserve(ModelSpec("s", "f", weights_nbytes(sharded), path=sharded))
        copy.fill(threading.Event())
        assert_same(copy.tensors(), tensors)
        loaded = torch.zeros_like(copy.flat)
        load_weights(sharded, into=loaded)
        assert torch.equal(copy.flat, loaded)
    finally:
        host.close()


class CancelAfter(threading.Event):
    """A cancel flag that is set from its ``n``-th look on."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.looks = 0
        self.n = n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def test_host_fill_looks_at_the_cancel_flag_between_slices(sharded: str, monkeypatch) -> None:
    monkeypatch.setattr("warmserve.worker_plugin.weight_store.SLICE", 1024)
    layout = read_layout(sharded)
    slices = sum(-(-(s.end - s.start) // 1024) for s in layout.shards)
    host = HostTier(16 * MiB)
    try:
        copy = host.reserve(ModelSpec("s", "f", layout.nbytes, path=sharded))
        never = CancelAfter(slices + 1)
        copy.fill(never)
        assert copy.filled and never.looks == slices
        copy.filled = False
        with pytest.raises(Cancelled):
            copy.fill(CancelAfter(slices))  # the last shard's last slice
        assert not copy.filled
    finally:
        host.close()


def test_device_tier_holds_the_sharded_model(sharded: str, tensors) -> None:
    async def in_thread(fn, *args):
        return await asyncio.to_thread(fn, *args)

    store = WeightStore([Device("node", "cpu", 0, 64 * MiB)], 64 * MiB, in_thread)
    try:
        spec = ModelSpec("s", "f", weights_nbytes(sharded), path=sharded)
        asyncio.run(store.to_device(spec, "node/cpu:0", threading.Event()))
        assert_same(dict(store.weights("s", "node/cpu:0")), tensors)
    finally:
        store.close()


def test_a_folder_without_safetensors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors") as e:
        read_layout(os.fspath(tmp_path))
    assert e.value.filename == os.fspath(tmp_path)


def test_an_index_naming_a_missing_shard(sharded: str) -> None:
    missing = os.path.join(sharded, "model-00002-of-00003.safetensors")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(INDEX_FILE)) as e:
        load_weights(sharded)
    assert e.value.filename == missing


def test_an_index_without_a_weight_map(sharded: str) -> None:
    with open(os.path.join(sharded, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(CheckpointError, match=f"{re.escape(INDEX_FILE)}: not a safetensors index"):
        read_layout(sharded)


def test_a_tensor_in_two_shards(sharded: str, tensors) -> None:
    again = os.path.join(sharded, "model-00003-of-00003.safetensors")
    save_file({**load_file(again), "a.weight": tensors["a.weight"]}, again)
    with pytest.raises(CheckpointError, match=r"'a\.weight' is also in .*model-00002-of-00003"):
        read_layout(sharded)


def test_an_unknown_dtype(single: str) -> None:
    path = os.path.join(single, WEIGHTS_FILE)
    save_file({"x": torch.zeros(2, dtype=torch.complex64)}, path)
    with pytest.raises(CheckpointError, match="'x' has dtype C64"):
        read_layout(single)


@pytest.mark.engine
def test_vllm_serves_a_sharded_copy_as_the_original(tmp_path) -> None:
    """An engine started on the shards generates what the single file does, and switches between
    the two (from disk and from host tensors) change nothing."""
    (original,) = make_family("shard", "tiny", replicas=1, out=tmp_path / "one").values()
    folder = os.fspath(tmp_path / "sharded")
    shutil.copytree(original.path, folder, ignore=shutil.ignore_patterns(WEIGHTS_FILE))
    weights = load_file(os.path.join(original.path, WEIGHTS_FILE))
    half = sum(t.nbytes for t in weights.values()) * 6 // 10
    assert len(save_sharded(weights, folder, max_shard_size=half)) == 2
    copy = ModelSpec("shard-copy", original.family, weights_nbytes(folder), path=folder)

    def greedy(model: str) -> list[int]:
        req = GenerateRequest(
            f"{model}-{next(ids)}", model, prompt="Return a sorted list of the items.",
            max_tokens=12, temperature=0.0, ignore_eos=True,
        )  # fmt: skip
        return asyncio.run(engine.complete(req)).token_ids

    ids = itertools.count()
    engine = Engine(copy)
    try:
        from_shards = greedy(copy.name)
        engine.switch(original)
        assert greedy(original.name) == from_shards
        engine.switch(copy, load_weights(copy.path))
        assert greedy(copy.name) == from_shards
        engine.switch(copy)
        assert greedy(copy.name) == from_shards
    finally:
        engine.shutdown()
