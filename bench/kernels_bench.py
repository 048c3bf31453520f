"""Host backend costs: mapping a region run by run (one mmap per run) against chunk by chunk.

python bench/kernels_bench.py --out bench/results/kernels_host.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from warmserve.kernels import MemorySwitcher

MiB = 1 << 20


def time_switch(sw: MemorySwitcher, nbytes: int, repeats: int) -> dict:
    """Median reserve and release times of one ``nbytes`` region, touched once per cycle."""
    maps, unmaps = [], []
    calls_before = sw.stats()["map_calls"]
    for _ in range(repeats):
        start = time.perf_counter()
        region = sw.reserve("r", nbytes)
        maps.append(time.perf_counter() - start)
        region.tensor(torch.uint8, (1,)).fill_(1)
        start = time.perf_counter()
        sw.release("r")
        unmaps.append(time.perf_counter() - start)
    calls = (sw.stats()["map_calls"] - calls_before) // repeats
    return {
        "map_calls": calls,
        "reserve_s_median": statistics.median(maps),
        "release_s_median": statistics.median(unmaps),
    }


def fragmented(chunks: int) -> MemorySwitcher:
    """A pool whose free chunks are all single: every other chunk held by a pinning region."""
    sw = MemorySwitcher(2 * chunks * 2 * MiB, 2 * MiB, backend="host")
    for i in range(2 * chunks):
        sw.reserve(f"pin{i}", 2 * MiB)
    for i in range(0, 2 * chunks, 2):
        sw.release(f"pin{i}")
    return sw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench/results/kernels_host.json")
    args = parser.parse_args()
    nbytes = args.mib * MiB
    with MemorySwitcher(nbytes, 2 * MiB, backend="host") as sw:
        one_run = time_switch(sw, nbytes, args.repeats)
    with fragmented(nbytes // (2 * MiB)) as sw:
        per_chunk = time_switch(sw, nbytes, args.repeats)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "region_bytes": nbytes,
        "chunk_bytes": 2 * MiB,
        "one_run": one_run,
        "per_chunk": per_chunk,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
