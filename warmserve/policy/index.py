"""The per-device index and per-group bounds the ledger keeps for placement.

:class:`~warmserve.policy.accounting.Accounting` builds them (``device_index``, ``group_stats``)
and keeps them up to date as replicas come and go; :mod:`warmserve.policy.placement` ranks
groups with them. Types only, kept apart so the ledger's module stays about the ledger.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DeviceIndex(NamedTuple):
    """Per-device figures as arrays in snapshot order, so placement can rank every group of a
    1,000-device cluster with a few numpy reductions instead of a Python scan.

    ``count`` counts replicas of any kind, ``inst`` instances; ``rbytes``, ``rsum``, ``rmin``
    and ``rmax`` cover resident (not serving) replicas only: their shard bytes (and the engines
    that would go with them, of families no instance there serves), and the sum, least and
    greatest of their scores (``rmin`` is +inf and ``rmax`` -inf on a device with
    none). ``rshare`` spreads each resident's score evenly over its devices, so the shares on a
    group's devices add up to at most what its distinct residents are worth.
    """

    free: np.ndarray
    count: np.ndarray
    inst: np.ndarray
    rbytes: np.ndarray
    rsum: np.ndarray
    rmin: np.ndarray
    rmax: np.ndarray
    rshare: np.ndarray


class GroupStats(NamedTuple):
    """:class:`DeviceIndex` folded over the TP groups of one size, one row per group, for
    bounds on what placing there costs. Kept up to date row by row as devices change: the
    planner places hundreds of replicas per call, each changing a group or two, and gathering
    every group's devices anew each time cost more than the placements.

    ``free`` is the least free memory on a device of the group, ``room`` the least free memory
    plus resident bytes; ``count`` the most replicas on one device; ``rmin`` and ``rmax`` the
    least and greatest resident score. ``inst`` and ``rsum`` bound from below the distinct
    instances and the sum of the distinct residents' scores over the group: exact (the sum
    taken in :meth:`Accounting.overlapping` order, as placement takes it) for single devices
    and rows updated since the build; otherwise the most on one device, and the larger of one
    device's sum and the group's shares a hair below, so rounding cannot lift it over the sum.
    """

    free: np.ndarray
    count: np.ndarray
    inst: np.ndarray
    room: np.ndarray
    rmin: np.ndarray
    rmax: np.ndarray
    rsum: np.ndarray


INDEX_TYPES = (np.int64, np.int64, np.int64, np.int64, float, float, float, float)
BELOW = 1 - 1e-9  # a float bound times this stays under the sum it bounds despite rounding
