"""How a checkpoint's tensors land in a running engine's parameters, as a list of plain copies.

Why: switching an engine to another model of its family must not move its parameters, because
the CUDA graphs it captured at start read them at fixed addresses. vLLM's own ``reload_weights``
keeps the addresses too, but in vLLM 0.26 it rebuilds each layer on the side (new tensors, the
weight loaders, then a copy back), which costs two passes over the bytes and a Python walk of
every module. When the engine's parameters are the checkpoint's tensors, at most stacked along
their first dimension (vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into
``gate_up_proj`` at tensor parallelism 1, named by the model's ``packed_modules_mapping``), a
switch is one device copy per checkpoint tensor into a row range of its parameter: for a model
held in the device pool, a device-to-device copy at memory bandwidth.

A plan exists only when it covers every parameter exactly (every row, dtype and trailing shape
agree; rows past the checkpoint's are allowed for vocabulary padding, which vLLM zeroes). Where
a backend repacks parameters into kernel layouts (vLLM's CPU backend does; its parameters can
have no elements), :func:`plan_copies` says why there is no plan and the engine falls back to
``reload_weights``. Pure torch metadata: no vLLM import, so it is tested on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Spec = tuple[torch.dtype, tuple[int, ...]]

UNUSED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
"""Buffers some older checkpoints carry that engines recompute (vLLM's Llama skips them too)."""


class NoPlan(ValueError):
    """The checkpoint does not map onto the parameters as plain row copies; the reason says why."""


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy checkpoint tensor ``source`` into rows ``[row, row + rows)`` of parameter ``param``."""

    source: str
    param: str
    row: int
    rows: int


def plan_copies(
    params: Mapping[str, Spec],
    checkpoint: Mapping[str, Spec],
    packed: Mapping[str, Sequence[str]],
) -> tuple[Copy, ...]:
    """The copies that load ``checkpoint`` into ``params``; NoPlan when there are none.

    ``params`` and ``checkpoint`` map names to (dtype, shape); ``packed`` is the model's
    ``packed_modules_mapping`` (fused module name to the checkpoint modules stacked in it, in
    order). Checkpoint tensors the engine has no parameter for are an error, since silently
    skipping them could serve a model with some of another model's weights.
    """
    shards: dict[str, dict[int, tuple[str, Spec]]] = {}
    expected: dict[str, int] = {}
    for name, spec in checkpoint.items():
        if name.endswith(UNUSED):
            continue
        target, index, count = _target(name, packed)
        expected[target] = count
        if target not in params:
            raise NoPlan(f"checkpoint tensor {name!r} has no parameter {target!r} in the engine")
        if index in shards.setdefault(target, {}):
            raise NoPlan(f"{target!r} is filled twice (by {name!r})")
        shards[target][index] = (name, spec)
    missing = sorted(set(params) - set(shards))
    if missing:
        raise NoPlan(f"the checkpoint has nothing for parameters {missing[:3]}")
    copies = []
    for target, parts in shards.items():
        dtype, shape = params[target]
        if not shape or 0 in shape:
            raise NoPlan(f"{target!r} is repacked by the backend (shape {shape})")
        row = 0
        for index in range(expected[target]):
            if index not in parts:
                raise NoPlan(f"{target!r} lacks shard {index} in the checkpoint")
            source, (src_dtype, src_shape) = parts[index]
            if src_dtype != dtype or tuple(src_shape[1:]) != tuple(shape[1:]) or not src_shape:
                raise NoPlan(
                    f"{source!r} is {src_dtype}{tuple(src_shape)}, "
                    f"{target!r} is {dtype}{tuple(shape)}"
                )
            copies.append(Copy(source, target, row, src_shape[0]))
            row += src_shape[0]
        if row > shape[0] or (row < shape[0] and expected[target] > 1):
            raise NoPlan(f"{target!r} has {shape[0]} rows, the checkpoint fills {row}")
    return tuple(copies)


def apply(
    copies: Sequence[Copy],
    params: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
) -> None:
    """Run the copies (asynchronously on the current stream on a GPU; the caller syncs).

    Under ``no_grad``: engines keep ``requires_grad`` on their parameters (vLLM's GPU runner
    does), and autograd refuses in-place writes to those.
    """
    with torch.no_grad():
        for c in copies:
            params[c.param].narrow(0, c.row, c.rows).copy_(weights[c.source], non_blocking=True)


def specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    """(dtype, shape) of each tensor: what :func:`plan_copies` compares."""
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _target(name: str, packed: Mapping[str, Sequence[str]]) -> tuple[str, int, int]:
    """The parameter a checkpoint tensor fills, its shard's place there and the shard count
    (0 and 1 if unfused)."""
    parts = name.split(".")
    for fused, members in packed.items():
        for index, member in enumerate(members):
            if member in parts:
                at = parts.index(member)
                return ".".join([*parts[:at], fused, *parts[at + 1 :]]), index, len(members)
    return name, 0, 1
