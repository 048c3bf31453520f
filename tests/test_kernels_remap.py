"""Slots: one fixed address range showing resident regions in turn, without copying.

The host backend (memfd + mmap MAP_FIXED) runs everywhere; the CUDA test, marked ``gpu``, checks
the property slots exist for: a CUDA graph captured over a slot replays on whichever region is
bound.
"""

from __future__ import annotations

import pytest
import torch

from warmserve.kernels import MemorySwitcher, TensorLayout, bind_module, cuda_memory, store_tensors

MiB = 1 << 20
CHUNK = 2 * MiB


@pytest.fixture
def sw():
    switcher = MemorySwitcher(32 * MiB, CHUNK, backend="host")
    yield switcher
    switcher.close()


def protection(address: int) -> str:
    """The permissions (``rw-s``, ``---p``) of the mapping holding ``address``, from the kernel."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return perms
    return "unmapped"


def two_models(sw: MemorySwitcher, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Regions ``a`` and ``b`` of ``nbytes`` each, filled with different int32 patterns."""
    views = []
    for seed, tag in enumerate(["a", "b"]):
        view = sw.reserve(tag, nbytes).tensor(torch.int32, (nbytes // 4,))
        view.copy_(
            torch.randint(
                -(2**31),
                2**31 - 1,
                view.shape,
                dtype=torch.int32,
                generator=torch.Generator().manual_seed(seed),
            )
        )
        views.append(view)
    return views[0], views[1]


def test_bind_shows_each_region_at_the_same_addresses(sw):
    a, b = two_models(sw, 6 * MiB)
    free = sw.free_bytes
    slot = sw.slot("engine", 6 * MiB)
    assert sw.free_bytes == free
    slot.bind("a")
    view = slot.tensor(torch.int32, (6 * MiB // 4,))
    assert view.data_ptr() == slot.address
    assert torch.equal(view, a)
    slot.bind("b")
    assert view.data_ptr() == slot.address
    assert torch.equal(view, b)
    slot.bind("a")
    assert torch.equal(view, a)
    assert sw.stats()["slots"] == {"engine": "a"}


def test_slot_aliases_the_region_instead_of_copying_it(sw):
    a, _ = two_models(sw, 4 * MiB)
    slot = sw.slot("engine", 4 * MiB)
    slot.bind("a")
    view = slot.tensor(torch.int32, (4 * MiB // 4,))
    a[12345] = 77
    assert view[12345].item() == 77
    view[-1] = -5
    assert a[-1].item() == -5
    slot.bind("b")
    slot.bind("a")
    assert view[12345].item() == 77 and view[-1].item() == -5


def test_region_of_several_runs_is_contiguous_in_the_slot(sw):
    sw.reserve("x", 4 * MiB)
    sw.reserve("y", 4 * MiB)
    sw.reserve("z", 20 * MiB)
    sw.release("x")
    region = sw.reserve("split", 8 * MiB)
    assert len(region.runs) == 2
    region.tensor(torch.int64, (MiB,)).copy_(torch.arange(MiB))
    slot = sw.slot("engine", 8 * MiB)
    slot.bind("split")
    assert torch.equal(slot.tensor(torch.int64, (MiB,)), torch.arange(MiB))


def test_binding_a_smaller_region_clears_the_tail(sw):
    sw.reserve("big", 8 * MiB)
    sw.reserve("small", 2 * MiB).tensor(torch.uint8, (1,)).fill_(9)
    slot = sw.slot("engine", 8 * MiB)
    slot.bind("big")
    assert protection(slot.address + 7 * MiB).startswith("rw")
    slot.bind("small")
    assert slot.tensor(torch.uint8, (1,)).item() == 9
    assert protection(slot.address + 2 * MiB) == "---p"
    assert protection(slot.address + 7 * MiB) == "---p"
    slot.unbind()
    assert protection(slot.address) == "---p"
    assert slot.bound is None


def test_bad_binds_change_nothing(sw):
    two_models(sw, 4 * MiB)
    sw.reserve("large", 8 * MiB)
    slot = sw.slot("engine", 4 * MiB)
    slot.bind("a")
    calls = sw.stats()["map_calls"]
    with pytest.raises(ValueError):
        slot.bind("large")
    with pytest.raises(KeyError):
        slot.bind("missing")
    assert slot.bound == "a" and sw.stats()["map_calls"] == calls
    slot.bind("a")
    assert sw.stats()["map_calls"] == calls
    with pytest.raises(ValueError):
        sw.slot("engine", 4 * MiB)
    with pytest.raises(ValueError):
        sw.slot("empty", 0)


def test_views_need_a_bound_region(sw):
    slot = sw.slot("engine", 4 * MiB)
    with pytest.raises(RuntimeError):
        slot.tensor(torch.uint8, (1,))
    two_models(sw, 4 * MiB)
    slot.bind("a")
    with pytest.raises(ValueError):
        slot.tensor(torch.int32, (2,), offset=4 * MiB - 4)


def test_releasing_a_bound_region_unbinds_it_first(sw):
    two_models(sw, 4 * MiB)
    slot = sw.slot("engine", 4 * MiB)
    other = sw.slot("spare", 4 * MiB)
    slot.bind("a")
    other.bind("b")
    runs = sw.region("a").runs
    sw.release("a")
    assert slot.bound is None and other.bound == "b"
    assert sw.stats()["slots"] == {"engine": None, "spare": "b"}
    assert protection(slot.address) == "---p"
    kv = sw.reserve("kv", 4 * MiB)
    assert kv.runs == runs
    kv.tensor(torch.uint8, (4 * MiB,)).fill_(1)
    assert protection(slot.address) == "---p"
    with pytest.raises(RuntimeError):
        slot.tensor(torch.uint8, (1,))


def test_close_gives_the_addresses_back(sw):
    two_models(sw, 4 * MiB)
    slot = sw.slot("engine", 4 * MiB)
    slot.bind("a")
    address = slot.address
    slot.close()
    assert protection(address) == "unmapped"
    assert sw.stats()["slots"] == {}
    with pytest.raises(RuntimeError):
        slot.bind("a")
    with pytest.raises(RuntimeError):
        slot.tensor(torch.uint8, (1,))
    slot.close()
    kept = sw.slot("engine", 4 * MiB)
    kept.bind("b")
    sw.close()
    assert protection(kept.address) == "unmapped"
    kept.close()


def toy_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    )


def test_module_on_a_slot_computes_with_whichever_model_is_bound(sw):
    models = {}
    for seed, tag in enumerate(["weights:a", "weights:b"]):
        torch.manual_seed(seed)
        models[tag] = toy_model()
        store_tensors(sw, tag, models[tag].state_dict())
    with torch.device("meta"):
        skeleton = toy_model()
    slot = sw.slot("engine", sw.region("weights:a").nbytes)
    slot.bind("weights:a")
    layout = TensorLayout.plan(models["weights:a"].state_dict())
    bind_module(skeleton, layout.views(slot))
    pointer = skeleton[0].weight.data_ptr()
    x = torch.randn(5, 16)
    for tag in ["weights:a", "weights:b", "weights:a"]:
        slot.bind(tag)
        assert skeleton[0].weight.data_ptr() == pointer
        assert torch.equal(skeleton(x), models[tag](x))


needs_cuda = pytest.mark.skipif(
    not cuda_memory.available(), reason="needs a CUDA device and cuda-python (cuda.bindings)"
)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_over_a_slot_replays_on_the_bound_region():
    with MemorySwitcher(64 * MiB, 4 * MiB, backend="cuda") as sw:
        n = 16 * MiB // 4
        data = {}
        for seed, tag in enumerate(["a", "b"]):
            data[tag] = torch.randn(
                n, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)
            )
            sw.reserve(tag, 16 * MiB).tensor(torch.float32, (n,)).copy_(data[tag])
        slot = sw.slot("engine", 16 * MiB)
        slot.bind("a")
        view = slot.tensor(torch.float32, (n,))
        assert view.is_cuda and view.data_ptr() == slot.address
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            (view * 2).sum()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = view * 2
        for tag in ["b", "a", "b"]:
            slot.bind(tag)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, data[tag] * 2)
        sw.region("b").tensor(torch.float32, (1,)).fill_(5.0)
        assert view[0].item() == 5.0
        calls = sw.stats()["unmap_calls"]
        slot.bind("a")
        assert sw.stats()["unmap_calls"] - calls in (1, 4)
        sw.release("a")
        assert slot.bound is None
        graph.reset()
