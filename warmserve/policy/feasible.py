"""Checks at load time: a model that can never serve, a share layout that places nothing.

Both used to fail in silence. A 70B model whose weights fit its TP group but whose weights, KV
cache and engine together did not was accepted, and every request for it waited until its
timeout; ``share`` with its default slots on 40 GB devices placed no model at all, dropped every
request and exited 0. The simulator refuses such a setting before it runs (exit 2), and the live
scheduler answers a request for a model that cannot run on the devices it has with the reason
instead of a wait. Same rule in both, written once here.

A model can serve on a TP group when :meth:`PolicyConfig.capacity
<warmserve.policy.config.PolicyConfig.capacity>` gives it at least one request there: each device
holds its weight shard, an engine (``engine_bytes``) and its share of the smallest useful KV cache,
one request's (``kv_per_request`` over ``tp``). On a larger device the instance takes more
requests, up to ``instance_capacity``, with the KV that fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from warmserve.policy.config import PolicyConfig
from warmserve.registry import ModelSpec


def per_device(spec: ModelSpec, config: PolicyConfig) -> int:
    """The least memory each device of a TP group needs for an instance of ``spec`` (one
    request's KV): ``config.capacity(spec, m) >= 1`` exactly when ``m`` is at least this."""
    weights = math.ceil(spec.nbytes / spec.tp)
    kv = math.ceil(config.kv_per_request(spec) / spec.tp)
    return weights + kv + config.engine_bytes


def never_serve(
    models: Mapping[str, ModelSpec],
    devices: Iterable[tuple[str, int]],
    config: PolicyConfig,
) -> dict[str, str]:
    """Models that no TP group of ``devices`` (``(node, memory bytes)`` pairs) can ever hold
    an instance of, each with the reason in numbers."""
    by_node: dict[str, list[int]] = {}
    for node, memory in devices:
        by_node.setdefault(node, []).append(memory)
    widest = max((len(m) for m in by_node.values()), default=0)
    out = {}
    for spec in models.values():
        if spec.tp > widest:
            out[spec.name] = (
                f"model {spec.name!r} needs tp={spec.tp} devices of one node; nodes have at "
                f"most {widest}"
            )
            continue
        # A group is tp devices of one node: the tp-th largest of a node bounds its best group.
        best = max(
            (sorted(m, reverse=True)[spec.tp - 1] for m in by_node.values() if len(m) >= spec.tp),
            default=0,
        )
        if config.capacity(spec, best) < 1:
            out[spec.name] = (
                f"model {spec.name!r} needs {_gb(per_device(spec, config))} per device of its "
                f"{spec.tp}-device group ({_gb(math.ceil(spec.nbytes / spec.tp))} of weights, "
                f"{_gb(math.ceil(config.kv_per_request(spec) / spec.tp))} of KV cache for one "
                f"request, {_gb(config.engine_bytes)} for the engine), "
                f"more than the {_gb(best)} of the largest such group's devices"
            )
    return out


def share_places_nothing(
    models: Mapping[str, ModelSpec], devices: Iterable[tuple[str, int]], config: PolicyConfig
) -> str | None:
    """Why ``share`` (:class:`~warmserve.policy.baselines.SharePolicy`) could place no model at
    all, or None: each device is cut into ``share_slots`` parts, and a model fits a part if its
    weight and KV shards do (the KV its instance reserves on such a device)."""
    largest = max((memory for _, memory in devices), default=0)
    part = largest // config.share_slots
    needs = {
        name: math.ceil(spec.nbytes / spec.tp)
        + math.ceil(config.kv_reservation(spec, largest) / spec.tp)
        for name, spec in models.items()
    }
    if not needs or min(needs.values()) <= part:
        return None
    smallest = min(needs, key=needs.__getitem__)
    return (
        f"share places no model: {config.share_slots} parts per device make parts of "
        f"{_gb(part)}, and the smallest need, {smallest!r}'s weights and KV cache, is "
        f"{_gb(needs[smallest])}; lower warmserve.policy.share-slots"
    )


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"
