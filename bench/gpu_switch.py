"""Zero-copy model switching with the memory switcher, against ordinary loading.

On a GPU (``--model 8b``): two Llama-3-8B-shaped models (random bf16 weights, about 15 GiB each)
resident in one pool; activating one by binding a meta-device skeleton to its pool views;
evicting the other and mapping its memory as KV space; 100 such switches with device memory
measured around them; ordinary loads (device copy, pinned host, local disk) for comparison; and
mapping 15 GiB in chunks (one physical handle each) of 2 MiB against larger ones. On a machine
without a GPU, ``--model tiny --backend host`` runs the same steps on a toy shape.

    python bench/gpu_switch.py --model 8b --out $OUT/gpu_switch.json
    python bench/gpu_switch.py --model tiny --backend host --out /tmp/gpu_switch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from warmserve.kernels import MemorySwitcher, TensorLayout, bind_module, module_specs

GiB = 1 << 30
MiB = 1 << 20

SHAPES = {
    # Llama-3-8B: 8.03e9 parameters, 14.96 GiB in bf16.
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    ),
}


class Bench:
    """Times steps on one device, synchronizing before each clock read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result

    def used(self) -> int:
        """Device memory in use (CUDA: total minus free) or this process's RSS on the host."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_config(shape: str) -> LlamaConfig:
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    return config


def skeleton(config: LlamaConfig, device: torch.device) -> LlamaForCausalLM:
    """A model with no weight memory (meta), rotary tables real: what stays up between models."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def fill_weights(views: dict[str, torch.Tensor], seed: int) -> None:
    """Deterministic random weights written in place (norms at 1, matrices at std 0.02)."""
    gen = torch.Generator(device=next(iter(views.values())).device).manual_seed(seed)
    for name, view in views.items():
        if name.endswith("norm.weight"):
            view.fill_(1.0)
        else:
            view.normal_(0.0, 0.02, generator=gen)


def forward(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def map_costs(bench: Bench, backend: str, nbytes: int, chunk_sizes: list[int]) -> list[dict]:
    """Create, map and unmap ``nbytes`` as one region, for each physical handle size."""
    rows = []
    for chunk in chunk_sizes:
        rows.append(_map_cost(bench, backend, _round_up(nbytes, chunk), chunk))
        print(f"map {nbytes / GiB:.1f} GiB, chunk {chunk / MiB:.0f} MiB: {rows[-1]}", flush=True)
    return rows


def _map_cost(bench: Bench, backend: str, nbytes: int, chunk: int) -> dict:
    create_s, sw = bench.time(lambda: MemorySwitcher(nbytes, chunk, backend=backend))
    maps, unmaps = [], []
    for _ in range(5):
        t, region = bench.time(lambda: sw.reserve("weights", nbytes))
        region.tensor(torch.uint8, (1,)).fill_(1)
        maps.append(t)
        unmaps.append(bench.time(lambda: sw.release("weights"))[0])
    calls = sw.stats()["map_calls"] // 5
    sw.close()
    return {
        "chunk_bytes": chunk,
        "mapped_bytes": nbytes,
        "map_calls_per_region": calls,
        "create_s": create_s,
        "map_s_median": statistics.median(maps),
        "unmap_s_median": statistics.median(unmaps),
    }


def ordinary_loads(
    bench: Bench,
    config: LlamaConfig,
    source: dict[str, torch.Tensor],
    layout: TensorLayout,
    disk_dir: str,
    disk_budget_s: float,
    drop_caches: bool,
) -> tuple[LlamaForCausalLM, dict]:
    """Load the same weights into a normal model: from device memory, pinned host, local disk."""
    ref = skeleton(config, bench.device)
    ref.to_empty(device=bench.device)
    with torch.device(bench.device):
        ref.model.rotary_emb = type(ref.model.rotary_emb)(config)
    params = dict(ref.state_dict(keep_vars=True))
    out: dict = {}

    def copy_from(tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            params[name].data.copy_(tensor, non_blocking=True)

    out["d2d_copy_s"] = min(bench.time(lambda: copy_from(source))[0] for _ in range(3))

    pinned = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=bench.device.type == "cuda")
    host_views = {
        name: pinned[s.offset : s.offset + s.dtype.itemsize * _numel(s.shape)]
        .view(s.dtype)
        .view(s.shape)
        for name, s in layout.slots.items()
    }
    for name, tensor in source.items():
        host_views[name].copy_(tensor)
    out["pinned_host_to_device_s"] = min(
        bench.time(lambda: copy_from(host_views))[0] for _ in range(2)
    )

    path = os.path.join(disk_dir, "gpu_switch_weights.bin")
    raw = pinned.numpy()
    piece = 256 * MiB
    start = time.perf_counter()
    written = 0
    with open(path, "wb") as f:
        while written < layout.nbytes and time.perf_counter() - start < disk_budget_s:
            written += f.write(memoryview(raw[written : written + piece]))
        f.flush()
        os.fsync(f.fileno())
    out["disk_write_s"] = time.perf_counter() - start
    out["disk_bytes"] = written
    out["page_cache_dropped"] = False
    if drop_caches:
        dropped = subprocess.run(
            ["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"], capture_output=True
        )
        out["page_cache_dropped"] = dropped.returncode == 0
    out["disk_fs"] = subprocess.run(
        ["df", "-T", disk_dir], capture_output=True, text=True
    ).stdout.strip()

    def load_from_disk() -> None:
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < written:
                done += f.readinto(memoryview(raw[done : min(done + piece, written)]))
        if written == layout.nbytes:
            copy_from(host_views)

    out["disk_to_device_s"] = bench.time(load_from_disk)[0]
    out["disk_read_gbps"] = written / out["disk_to_device_s"] / 1e9
    out["disk_to_device_full_model_s_estimate"] = (
        layout.nbytes / written * out["disk_to_device_s"] if written else None
    )
    os.remove(path)
    copy_from(source)
    return ref, out


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default="gpu_switch.json")
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--chunk-mib", type=int, default=64, help="chunk of the two-model pool")
    parser.add_argument("--disk-dir", default=".")
    parser.add_argument("--disk-budget-s", type=float, default=60.0)
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the page cache before reading weights back (the whole machine's: a lent one)",
    )
    args = parser.parse_args()

    cuda = args.backend in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    bench = Bench(device)
    result: dict = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model_shape": args.model,
    }
    import transformers

    result["transformers"] = transformers.__version__
    if cuda:
        from cuda import bindings

        result["cuda_bindings"] = bindings.__version__
    used_at_start = bench.used()
    switch_models(args, bench, result)
    if cuda:
        torch.cuda.empty_cache()
    result["device_used_at_start"] = used_at_start
    result["device_used_at_end"] = bench.used()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps(_summary(result), indent=1))


def switch_models(args: argparse.Namespace, bench: Bench, result: dict) -> None:
    """Every measured step; returns once all its device memory can be freed."""
    device = bench.device
    cuda = device.type == "cuda"
    config = make_config(args.model)
    model_skeleton = skeleton(config, device)
    layout = TensorLayout.plan(module_specs(model_skeleton))
    result["model_bytes"] = layout.nbytes
    print(f"model: {layout.nbytes / GiB:.2f} GiB in {len(layout.slots)} tensors", flush=True)

    # 1. Mapping one model's worth of memory, one handle (and one cuMemMap) per chunk.
    chunks = [2 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB] if cuda else [2 * MiB]
    result["mapping"] = map_costs(bench, args.backend, layout.nbytes, chunks)

    # 2. Two models resident in one pool.
    chunk = args.chunk_mib * MiB
    capacity = 2 * _round_up(layout.nbytes, chunk) + chunk
    sw = MemorySwitcher(capacity, chunk, backend=args.backend)
    result["pool"] = {"capacity": capacity, "backend": sw.backend, "chunk_bytes": chunk}
    views = {}
    for seed, name in enumerate(["a", "b"]):
        views[name] = layout.views(sw.reserve(f"weights:{name}", layout.nbytes))
        fill_weights(views[name], seed)
    result["pool"]["after_store"] = sw.stats()

    # 3. The ordinary ways to load model a, into a normal model (also the reference output).
    ref, result["ordinary_load"] = ordinary_loads(
        bench, config, views["a"], layout, args.disk_dir, args.disk_budget_s, args.drop_caches
    )
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=device)
    expected_a = forward(ref, ids)
    first_fwd_s, _ = bench.time(lambda: forward(ref, ids))

    # 4. Activation: bind the skeleton to a's pool views, then the first forward pass.
    def activate(name: str) -> tuple[float, float, torch.Tensor]:
        bind_s, _ = bench.time(lambda: bind_module(model_skeleton, views[name]))
        fwd_s, logits = bench.time(lambda: forward(model_skeleton, ids))
        return bind_s, fwd_s, logits

    bind_s, fwd_s, logits_a = activate("a")
    activation = {
        "first_ever": {"bind_s": bind_s, "forward_s": fwd_s},
        "reference_model_forward_s": first_fwd_s,
        "tokens": args.tokens,
        "output_equal_to_reference": bool(torch.equal(logits_a, expected_a)),
        "max_abs_diff": float((logits_a.float() - expected_a.float()).abs().max()),
    }
    binds, fwds = [], []
    for _ in range(5):
        for name in ("b", "a"):
            b, f, _ = activate(name)
            binds.append(b)
            fwds.append(f)
    activation["bind_s_median"] = statistics.median(binds)
    activation["forward_s_median"] = statistics.median(fwds)
    activation["activate_s_median"] = statistics.median(
        b + f for b, f in zip(binds, fwds, strict=True)
    )
    _, _, logits_b = activate("b")
    activation["b_differs_from_a"] = not torch.equal(logits_b, logits_a)
    result["activation"] = activation
    print(f"activation: {activation}", flush=True)

    # 5. Evict b, map its memory as KV space for a (a stays active), 100 times.
    kv_bytes = layout.nbytes
    _, _, logits = activate("a")
    evictions, maps = [], []
    used_before = bench.used()
    torch_before = torch.cuda.memory_allocated() if cuda else 0
    b_runs = sw.region("weights:b").runs
    same_chunks = 0
    for cycle in range(args.cycles):
        evict_s, _ = bench.time(lambda: sw.release("weights:b"))
        map_s, kv = bench.time(lambda: sw.reserve("kv:a", kv_bytes))
        same_chunks += kv.runs == b_runs
        kv.tensor(torch.bfloat16, (kv_bytes // 2,)).fill_(float(cycle))
        evictions.append(evict_s)
        maps.append(map_s)
        sw.release("kv:a")
        views["b"] = layout.views(sw.reserve("weights:b", layout.nbytes))
        fill_weights(views["b"], 1)
        _, _, logits_b_again = activate("b")
        _, _, logits = activate("a")
    used_after = bench.used()
    result["evict_and_map_kv"] = {
        "cycles": args.cycles,
        "kv_bytes": kv_bytes,
        "evict_s_median": statistics.median(evictions),
        "map_kv_s_median": statistics.median(maps),
        "evict_plus_map_s_median": statistics.median(
            e + m for e, m in zip(evictions, maps, strict=True)
        ),
        "evict_plus_map_s_max": max(e + m for e, m in zip(evictions, maps, strict=True)),
        "kv_reused_b_chunks_in_cycles": same_chunks,
        "device_used_before": used_before,
        "device_used_after": used_after,
        "device_used_growth": used_after - used_before,
        "torch_allocated_growth": (torch.cuda.memory_allocated() - torch_before) if cuda else 0,
        "a_output_still_equal": bool(torch.equal(logits, expected_a)),
        "b_output_same_after_reload": bool(torch.equal(logits_b_again, logits_b)),
        "pool_stats": sw.stats(),
    }
    print(f"evict+map: {result['evict_and_map_kv']}", flush=True)

    sw.close()


def _summary(result: dict) -> dict:
    """The few numbers worth reading in the call's output."""
    return {
        "device": result["device"],
        "model_gib": result["model_bytes"] / GiB,
        "mapping": [
            (
                r["chunk_bytes"] // MiB,
                r["map_calls_per_region"],
                r["map_s_median"],
                r["unmap_s_median"],
            )
            for r in result["mapping"]
        ],
        "ordinary_load": result["ordinary_load"],
        "activate_s": result["activation"]["activate_s_median"],
        "bind_s": result["activation"]["bind_s_median"],
        "equal": result["activation"]["output_equal_to_reference"],
        "evict_plus_map_s": result["evict_and_map_kv"]["evict_plus_map_s_median"],
        "growth": result["evict_and_map_kv"]["device_used_growth"],
        "end_vs_start": result["device_used_at_end"] - result["device_used_at_start"],
    }


if __name__ == "__main__":
    main()
