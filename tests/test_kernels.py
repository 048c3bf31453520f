"""The memory switcher on the host backend (memfd + mmap), and on CUDA where a GPU is present."""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from warmserve.kernels import (
    MemorySwitcher,
    OutOfChunks,
    TensorLayout,
    bind_module,
    cuda_memory,
    module_specs,
    store_tensors,
)
from warmserve.kernels.chunks import ChunkPool
from warmserve.kernels.host_memory import open_shared

MiB = 1 << 20
CHUNK = 2 * MiB


@pytest.fixture
def sw():
    switcher = MemorySwitcher(32 * MiB, CHUNK, backend="host")
    yield switcher
    switcher.close()


def raw_bytes(address: int, n: int) -> bytes:
    return ctypes.string_at(address, n)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Chunk bookkeeping


def test_take_prefers_the_shortest_run_that_fits():
    pool = ChunkPool(10)
    pool.take(10)
    pool.give([(0, 4), (5, 2), (8, 2)])
    assert pool.take(2) == [(5, 2)]
    assert pool.free_runs() == [(0, 4), (8, 2)]


def test_take_without_a_fitting_run_uses_longest_runs_first():
    pool = ChunkPool(10)
    pool.take(10)
    pool.give([(0, 1), (2, 3), (6, 2)])
    assert pool.take(5) == [(2, 3), (6, 2)]
    assert pool.free_runs() == [(0, 1)]


def test_take_too_many_changes_nothing():
    pool = ChunkPool(4)
    pool.take(3)
    assert pool.take(2) is None
    assert pool.free_runs() == [(3, 1)]


def test_giving_back_a_free_chunk_is_refused():
    pool = ChunkPool(4)
    runs = pool.take(2)
    pool.give(runs)
    with pytest.raises(ValueError):
        pool.give(runs)


# Reserve / release


def test_reserve_and_release_keep_the_books(sw):
    a = sw.reserve("weights:a", 5 * MiB)
    assert a.mapped_bytes == 6 * MiB
    assert sw.used_bytes == 6 * MiB and sw.free_bytes == 26 * MiB
    sw.reserve("kv:a", 2 * MiB)
    assert sw.tags() == ["weights:a", "kv:a"]
    with pytest.raises(ValueError):
        sw.reserve("kv:a", CHUNK)
    sw.release("weights:a")
    assert sw.tags() == ["kv:a"]
    assert sw.used_bytes == 2 * MiB
    with pytest.raises(KeyError):
        sw.release("weights:a")
    with pytest.raises(RuntimeError):
        a.tensor(torch.uint8, (1,))


def test_out_of_chunks_changes_nothing(sw):
    sw.reserve("a", 20 * MiB)
    before = sw.stats()
    with pytest.raises(OutOfChunks) as info:
        sw.reserve("b", 14 * MiB)
    assert isinstance(info.value, MemoryError)
    assert sw.stats() == before
    assert sw.reserve("b", 12 * MiB).mapped_bytes == 12 * MiB


def test_region_views_are_zero_copy(sw):
    region = sw.reserve("a", 6 * MiB)
    view = region.tensor(torch.float32, (3, 4), offset=4 * MiB + 16)
    assert view.data_ptr() == region.address + 4 * MiB + 16
    view.copy_(torch.arange(12, dtype=torch.float32).view(3, 4))
    raw = raw_bytes(region.address + 4 * MiB + 16, 48)
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), torch.arange(12.0))
    ctypes.memset(region.address + 4 * MiB + 16, 0, 4)
    assert view[0, 0].item() == 0.0
    with pytest.raises(ValueError):
        region.tensor(torch.float32, (2,), offset=6 * MiB - 4)
    with pytest.raises(ValueError):
        region.tensor(torch.float32, (2,), offset=2)


def test_released_chunks_are_remapped_without_copying(sw):
    weights = sw.reserve("weights:other", 32 * MiB)
    pattern = torch.randint(0, 255, (32 * MiB,), dtype=torch.uint8)
    weights.tensor(torch.uint8, (32 * MiB,)).copy_(pattern)
    runs = weights.runs
    sw.release("weights:other")
    kv = sw.reserve("kv:model", 32 * MiB)
    assert kv.runs == runs
    kv_bytes = kv.tensor(torch.uint8, (32 * MiB,))
    assert torch.equal(kv_bytes, pattern)
    kv_bytes.fill_(7)
    assert raw_bytes(kv.address + 123, 3) == b"\x07\x07\x07"


def test_region_over_fragmented_chunks_maps_each_run_in_order(sw):
    sw.reserve("a", 4 * MiB)
    sw.reserve("b", 4 * MiB)
    sw.reserve("c", 20 * MiB)
    sw.release("a")
    calls = sw.stats()["map_calls"]
    region = sw.reserve("d", 8 * MiB)
    assert region.runs == ((0, 2), (14, 2))
    assert sw.stats()["map_calls"] == calls + 2
    data = region.tensor(torch.int64, (MiB,))
    data.copy_(torch.arange(MiB))
    with open(region.share_info()["path"], "rb") as f:
        f.seek(14 * CHUNK)
        second_run = torch.frombuffer(bytearray(f.read(4 * MiB)), dtype=torch.int64)
    assert torch.equal(second_run, torch.arange(MiB // 2, MiB))


def test_two_mappings_of_one_chunk_alias(sw):
    region = sw.reserve("a", 4 * MiB)
    other = open_shared(region.share_info())
    try:
        assert other.address != region.address
        region.tensor(torch.int32, (4,), offset=3 * MiB).copy_(torch.tensor([1, 2, 3, 4]))
        seen = other.tensor()[3 * MiB : 3 * MiB + 16].view(torch.int32)
        assert seen.tolist() == [1, 2, 3, 4]
        seen[0] = 42
        assert region.tensor(torch.int32, (1,), offset=3 * MiB).item() == 42
    finally:
        other.close()


def test_child_process_reads_and_writes_the_shared_region(sw):
    region = sw.reserve("weights:a", 6 * MiB)
    values = region.tensor(torch.float64, (6 * MiB // 8,))
    values.copy_(torch.rand(values.shape, dtype=torch.float64))
    child = (
        "import json, sys\n"
        "from warmserve.kernels.host_memory import open_shared\n"
        "shared = open_shared(json.loads(sys.argv[1]))\n"
        "data = shared.tensor().view(__import__('torch').float64)\n"
        "print(repr(__import__('math').fsum(data.tolist())))\n"
        "data[-1] = -1.0\n"
        "shared.close()\n"
    )
    # fsum is exact whatever the order: torch's sum depends on the thread count, which an engine
    # started earlier in the session may have changed in this process.
    expected = math.fsum(values.tolist())
    out = subprocess.run(
        [sys.executable, "-c", child, json.dumps(region.share_info())],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert float(out.stdout) == expected
    assert values[-1].item() == -1.0


# Tensors and modules in a region


def test_store_tensors_round_trip(sw):
    tensors = {
        "embed": torch.randn(33, 7),
        "norm": torch.randn(7, dtype=torch.bfloat16),
        "ids": torch.randint(-5, 5, (3, 5, 2), dtype=torch.int64),
        "mask": torch.rand(17) > 0.5,
    }
    views = store_tensors(sw, "weights:toy", tensors)
    region = sw.region("weights:toy")
    for name, tensor in tensors.items():
        assert torch.equal(views[name], tensor)
        assert region.address <= views[name].data_ptr() < region.address + region.nbytes
        assert (views[name].data_ptr() - region.address) % 256 == 0
    layout = TensorLayout.plan(tensors)
    again = layout.views(region)
    assert all(again[n].data_ptr() == views[n].data_ptr() for n in tensors)


def toy_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


def test_bound_meta_module_computes_like_the_original(sw):
    torch.manual_seed(0)
    reference = toy_model()
    views = store_tensors(sw, "weights:toy", reference.state_dict())
    with torch.device("meta"):
        skeleton = toy_model()
    assert set(module_specs(skeleton)) == set(views)
    bind_module(skeleton, views)
    assert skeleton[0].weight.data_ptr() == views["0.weight"].data_ptr()
    x = torch.randn(5, 16)
    assert torch.equal(skeleton(x), reference(x))


def test_bind_with_a_wrong_shape_changes_nothing(sw):
    model = toy_model()
    views = store_tensors(sw, "weights:toy", model.state_dict())
    before = model[0].weight
    bad = dict(views)
    bad["3.weight"] = torch.zeros(4, 31)
    with pytest.raises(ValueError):
        bind_module(model, bad)
    assert model[0].weight is before
    with pytest.raises(KeyError):
        bind_module(model, {"9.weight": torch.zeros(1)})


# Memory stays flat


def test_hundred_switches_keep_rss_and_memfd_flat():
    with MemorySwitcher(64 * MiB, CHUNK, backend="host") as sw:

        def cycle(i: int) -> None:
            weights = sw.reserve("weights:b", 40 * MiB)
            weights.tensor(torch.uint8, (40 * MiB,)).fill_(i % 251)
            sw.release("weights:b")
            kv = sw.reserve("kv:a", 40 * MiB)
            assert kv.tensor(torch.uint8, (1,)).item() == i % 251
            kv.tensor(torch.uint8, (40 * MiB,)).fill_(1)
            sw.release("kv:a")

        cycle(0)
        rss, physical = rss_bytes(), sw.stats()["physical_bytes"]
        size = os.stat(sw.reserve("probe", CHUNK).share_info()["path"]).st_size
        sw.release("probe")
        for i in range(1, 101):
            cycle(i)
        assert sw.stats()["physical_bytes"] == physical
        assert abs(rss_bytes() - rss) < 8 * MiB
        info = sw.reserve("probe", CHUNK).share_info()
        assert os.stat(info["path"]).st_size == size == 64 * MiB


def test_trim_returns_free_chunks_and_close_releases_all():
    sw = MemorySwitcher(32 * MiB, CHUNK, backend="host")
    keep = sw.reserve("keep", 8 * MiB)
    keep.tensor(torch.uint8, (8 * MiB,)).fill_(3)
    sw.reserve("drop", 24 * MiB).tensor(torch.uint8, (24 * MiB,)).fill_(5)
    assert sw.stats()["physical_bytes"] >= 32 * MiB
    sw.release("drop")
    sw.trim()
    assert sw.stats()["physical_bytes"] == 8 * MiB
    assert keep.tensor(torch.uint8, (8 * MiB,))[::4096].eq(3).all()
    again = sw.reserve("drop", 24 * MiB).tensor(torch.uint8, (24 * MiB,))
    assert again[::4096].eq(0).all()
    again.fill_(9)
    rss_full = rss_bytes()
    sw.close()
    assert rss_bytes() < rss_full - 30 * MiB
    with pytest.raises(RuntimeError):
        sw.reserve("x", CHUNK)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        MemorySwitcher(4 * MiB, CHUNK, backend="tpu")


# CUDA


needs_cuda = pytest.mark.skipif(
    not cuda_memory.available(), reason="needs a CUDA device and cuda-python (cuda.bindings)"
)


@pytest.mark.gpu
@needs_cuda
def test_cuda_regions_remap_chunks_without_copying():
    with MemorySwitcher(256 * MiB, 4 * MiB, backend="cuda") as sw:
        assert sw.backend == "cuda"
        a = sw.reserve("weights:a", 100 * MiB)
        assert sw.stats()["map_calls"] == 25
        sw.reserve("b", 100 * MiB)
        view = a.tensor(torch.float32, (25 * MiB,))
        assert view.is_cuda and view.data_ptr() == a.address
        pattern = torch.randn(25 * MiB, device="cuda")
        view.copy_(pattern)
        runs = a.runs
        sw.release("weights:a")
        kv = sw.reserve("kv:b", 100 * MiB)
        assert kv.runs == runs
        assert torch.equal(kv.tensor(torch.float32, (25 * MiB,)), pattern)


@pytest.mark.gpu
@needs_cuda
def test_cuda_switch_cycles_keep_device_memory_flat():
    with MemorySwitcher(128 * MiB, CHUNK, backend="cuda") as sw:
        sw.reserve("w", 96 * MiB).tensor(torch.uint8, (96 * MiB,)).fill_(0)
        sw.release("w")
        torch.cuda.synchronize()
        free_before, _ = torch.cuda.mem_get_info()
        for i in range(50):
            sw.reserve("w", 96 * MiB).tensor(torch.uint8, (96 * MiB,)).fill_(i)
            sw.release("w")
        torch.cuda.synchronize()
        assert torch.cuda.mem_get_info()[0] == free_before
