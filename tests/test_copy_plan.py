"""The copy plan: a checkpoint's tensors into fused engine parameters as plain row copies.

The engine side is a torch module laid out as vLLM lays out a Llama at tensor parallelism 1 on a
GPU (``qkv_proj`` and ``gate_up_proj`` fused along rows, vocabulary padded); vLLM's CPU backend
repacks its parameters, so on this machine the plan is checked against that layout directly and
the CPU engine's fallback is checked in ``test_engine.py``.
"""

from __future__ import annotations

import pytest
import torch

from warmserve.engine import copy_plan
from warmserve.engine.copy_plan import Copy, NoPlan, apply, plan_copies, specs
from warmserve.models.make import SIZES, random_weights

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def fused(checkpoint: dict[str, torch.Tensor], pad_vocab: int = 0) -> dict[str, torch.Tensor]:
    """Parameters as vLLM holds them, filled with zeros (a different model is loaded)."""
    params: dict[str, torch.Tensor] = {}
    for name, t in checkpoint.items():
        for fused_name, members in PACKED.items():
            member = next((m for m in members if f".{m}." in name), None)
            if member is not None:
                target = name.replace(member, fused_name)
                rows = sum(checkpoint[name.replace(member, m)].shape[0] for m in members)
                params[target] = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
                break
        else:
            rows = t.shape[0] + (pad_vocab if "embed_tokens" in name or "lm_head" in name else 0)
            params[name] = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
    return params


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return random_weights(SIZES["tiny"], seed=3)


def test_plan_fills_fused_parameters_exactly(checkpoint):
    params = fused(checkpoint, pad_vocab=64)
    plan = plan_copies(specs(params), specs(checkpoint), PACKED)
    assert len(plan) == len(checkpoint)
    apply(plan, params, checkpoint)
    layer = "model.layers.2."
    q, k, v = (checkpoint[f"{layer}self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(params[f"{layer}self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
    gate, up = (checkpoint[f"{layer}mlp.{p}_proj.weight"] for p in ("gate", "up"))
    assert torch.equal(params[f"{layer}mlp.gate_up_proj.weight"], torch.cat([gate, up]))
    embed = params["model.embed_tokens.weight"]
    assert torch.equal(
        embed[: checkpoint["model.embed_tokens.weight"].shape[0]],
        checkpoint["model.embed_tokens.weight"],
    )
    assert not embed[-64:].any()  # vocabulary padding is left alone
    assert (
        Copy(
            f"{layer}self_attn.k_proj.weight",
            f"{layer}self_attn.qkv_proj.weight",
            q.shape[0],
            k.shape[0],
        )
        in plan
    )


def test_plan_writes_parameters_that_require_grad(checkpoint):
    """vLLM's GPU runner leaves requires_grad on; the copies must still write in place."""
    params = {
        name: torch.nn.Parameter(t, requires_grad=True) for name, t in fused(checkpoint).items()
    }
    apply(plan_copies(specs(params), specs(checkpoint), PACKED), params, checkpoint)
    name = "model.norm.weight"
    assert torch.equal(params[name], checkpoint[name])


def test_unused_rotary_buffers_are_skipped(checkpoint):
    params = fused(checkpoint)
    with_rotary = {**checkpoint, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}
    assert len(plan_copies(specs(params), specs(with_rotary), PACKED)) == len(checkpoint)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p, c: c.pop("model.layers.1.self_attn.k_proj.weight"), "lacks shard 1"),
        (lambda p, c: c.pop("model.norm.weight"), "nothing for parameters"),
        (lambda p, c: c.update({"model.extra.weight": torch.ones(2)}), "has no parameter"),
        (
            lambda p, c: p.update({"model.layers.0.mlp.down_proj.weight": torch.empty(0)}),
            "repacked",
        ),
        (
            lambda p, c: c.update({"model.norm.weight": c["model.norm.weight"].to(torch.float32)}),
            "torch.float32",
        ),
        (
            lambda p, c: c.update({"model.layers.0.self_attn.q_proj.weight": torch.ones(3, 3)}),
            "q_proj",
        ),
    ],
)
def test_no_plan_says_why(checkpoint, change, reason):
    ckpt = dict(checkpoint)
    params = fused(checkpoint)
    change(params, ckpt)
    with pytest.raises(NoPlan, match=reason):
        plan_copies(specs(params), specs(ckpt), PACKED)


def test_checkpoint_shorter_than_a_fused_parameter_is_refused(checkpoint):
    params = fused(checkpoint)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    rows, *rest = params[name].shape
    params[name] = torch.zeros(rows + 8, *rest, dtype=params[name].dtype)
    with pytest.raises(NoPlan, match="rows"):
        plan_copies(specs(params), specs(checkpoint), PACKED)


def test_module_imports_no_vllm():
    assert "vllm" not in copy_plan.__dict__
