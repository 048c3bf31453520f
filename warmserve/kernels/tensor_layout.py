"""Named tensors packed into one region, and modules whose parameters are views of it.

Why one region per model: a region costs a few driver calls whatever its size, so a model's
weights (hundreds of tensors) sit in one region, each tensor at an aligned offset, and the whole
model is evicted with one ``release``. Activating a resident model then means pointing a module's
parameters at views of that region, which copies nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from warmserve.kernels.switcher import MemorySwitcher, Region, Slot

ALIGNMENT = 256
"""Offsets are multiples of this: the widest vector load and what cuBLAS prefers."""


@dataclass(frozen=True)
class TensorSlot:
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorLayout:
    """Where each named tensor sits in a region, and the region's size."""

    slots: dict[str, TensorSlot]
    nbytes: int

    @classmethod
    def plan(cls, specs: Mapping[str, torch.Tensor | tuple[torch.dtype, tuple[int, ...]]]):
        """Lay out tensors (or (dtype, shape) pairs, e.g. from a meta-device module) in order."""
        slots = {}
        offset = 0
        for name, spec in specs.items():
            dtype, shape = (spec.dtype, tuple(spec.shape)) if torch.is_tensor(spec) else spec
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
            slots[name] = TensorSlot(offset, dtype, tuple(int(d) for d in shape))
            offset += _nbytes(dtype, shape)
        return cls(slots, max(offset, 1))

    def views(self, region: Region | Slot) -> dict[str, torch.Tensor]:
        """Zero-copy views of every tensor in ``region``, or in whichever region a slot shows."""
        if region.nbytes < self.nbytes:
            raise ValueError(f"region of {region.nbytes} bytes cannot hold layout of {self.nbytes}")
        return {
            name: region.tensor(slot.dtype, slot.shape, slot.offset)
            for name, slot in self.slots.items()
        }


def store_tensors(
    switcher: MemorySwitcher, tag: str, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Copy ``tensors`` into one new region named ``tag``; return views of the stored copies."""
    layout = TensorLayout.plan(tensors)
    region = switcher.reserve(tag, layout.nbytes)
    views = layout.views(region)
    for name, tensor in tensors.items():
        views[name].copy_(tensor)
    return views


def bind_module(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make ``module``'s parameters and buffers named in ``tensors`` be those tensors, uncopied.

    Names that the module lacks, and shape or dtype mismatches, raise before anything changes,
    so a failed bind leaves the module as it was.
    """
    targets = []
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_name)
        except AttributeError as missing:
            raise KeyError(f"{name!r}: the module has no submodule {owner_name!r}") from missing
        if leaf in owner._parameters:
            current = owner._parameters[leaf]
        elif leaf in owner._buffers:
            current = owner._buffers[leaf]
        else:
            raise KeyError(f"{name!r} is neither a parameter nor a buffer of the module")
        if current is not None and (current.shape != tensor.shape or current.dtype != tensor.dtype):
            raise ValueError(
                f"{name!r}: module has {current.dtype}{tuple(current.shape)}, "
                f"pool has {tensor.dtype}{tuple(tensor.shape)}"
            )
        targets.append((owner, leaf, tensor))
    for owner, leaf, tensor in targets:
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


def module_specs(module: torch.nn.Module) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each parameter and persistent buffer, e.g. of a meta-device module.

    Tied parameters appear under each of their names, so each name gets its own slot.
    """
    return {
        name: (t.dtype, tuple(t.shape)) for name, t in module.state_dict(keep_vars=True).items()
    }


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize
