"""Which physical chunks of a pool are free, and which to hand out next.

Every driver call costs the same whatever its size (a mmap, a cuMemMap of one handle), so the
choice of chunks decides how many calls a reservation makes. The picker therefore takes one free
run when one is long enough (the shortest such run, to keep long runs for later) and otherwise
the longest runs first, so that a region is made of as few runs as the free space allows.
"""

from __future__ import annotations

import numpy as np

Run = tuple[int, int]
"""A run of physically adjacent chunks: (first chunk index, number of chunks)."""


class ChunkPool:
    """Free/used bookkeeping for ``count`` equal chunks; knows nothing about memory."""

    def __init__(self, count: int) -> None:
        if count <= 0:
            raise ValueError(f"a pool needs at least one chunk, got {count}")
        self._free = np.ones(count, dtype=bool)

    @property
    def count(self) -> int:
        return int(self._free.size)

    @property
    def free_count(self) -> int:
        return int(self._free.sum())

    def free_runs(self) -> list[Run]:
        """The free chunks as maximal runs, in chunk order."""
        padded = np.concatenate(([False], self._free, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        starts, ends = edges[0::2], edges[1::2]
        return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]

    def take(self, n: int) -> list[Run] | None:
        """Mark ``n`` free chunks used and return them as runs (region order), or None if short.

        None leaves the pool unchanged, so a failed reservation has no side effects.
        """
        if n <= 0:
            raise ValueError(f"take needs a positive chunk count, got {n}")
        if n > self.free_count:
            return None
        runs = self.free_runs()
        fitting = [r for r in runs if r[1] >= n]
        if fitting:
            first, _ = min(fitting, key=lambda r: (r[1], r[0]))
            chosen = [(first, n)]
        else:
            chosen = []
            left = n
            for first, length in sorted(runs, key=lambda r: (-r[1], r[0])):
                take = min(length, left)
                chosen.append((first, take))
                left -= take
                if left == 0:
                    break
        for first, length in chosen:
            self._free[first : first + length] = False
        return chosen

    def give(self, runs: list[Run]) -> None:
        """Return chunks taken earlier; giving back a free chunk is a bookkeeping bug."""
        for first, length in runs:
            if self._free[first : first + length].any():
                raise ValueError(f"run {(first, length)} holds chunks that are already free")
        for first, length in runs:
            self._free[first : first + length] = True
