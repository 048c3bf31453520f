"""Generate model families: Llama configs, one tokenizer per family, random weights per replica.

A family is one architecture and tokenizer; its replicas (``tiny-0``, ``tiny-1``, ...) differ only
in their weights (seed ``seed + i``), so an engine of the family can switch among them in place and
each gives different outputs. Each replica folder is complete (config, tokenizer, weights) so vLLM
and transformers load it like a downloaded model. Generation is idempotent: a replica folder that
exists is kept, and a folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from warmserve.models.tokenizer import BOS, EOS, PAD, save_tokenizer, train_tokenizer
from warmserve.models.weights import WEIGHTS_FILE, weights_nbytes
from warmserve.registry import REGISTRY_FILE, ModelSpec, Registry


@dataclass(frozen=True, slots=True)
class Shape:
    """The architecture of a family. Head size must be one vLLM's CPU attention supports."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_len: int = 2048
    dtype: str = "bfloat16"


SIZES: dict[str, Shape] = {
    # A few MB: engines start fast and tests stay short.
    "tiny": Shape(vocab=1024, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
    # Tiny-sized but a different shape, so a cluster can hold two families that cannot share
    # an engine.
    "mini": Shape(vocab=1536, hidden=192, layers=2, heads=3, kv_heads=1, intermediate=512),
    # Hundreds of MB: loading from disk costs measurable time, as for a real model.
    "small": Shape(vocab=8192, hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816),
    # Llama-3-8B's dimensions (16 GB in bf16), for GPU benchmarks where no weights can be
    # downloaded. Generated on a GPU when there is one (seconds; minutes on a CPU).
    "8b": Shape(
        vocab=128256,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        max_len=8192,
    ),
}

# What `ensure_default_models` makes: (family, size, replicas). Two families, so the embedded
# cluster exercises placement across families as well as switching within one.
DEFAULT_FAMILIES: tuple[tuple[str, str, int], ...] = (("tiny", "tiny", 4), ("mini", "mini", 3))


def llama_config(shape: Shape, tokenizer: Tokenizer) -> dict:
    """A transformers ``config.json`` for LlamaForCausalLM with this shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
        "torch_dtype": shape.dtype,
    }


def random_weights(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    """Llama weights drawn from N(0, 0.02) (norms at 1), named as in a Hugging Face checkpoint.

    Drawn on the GPU when there is one (an 8B shape takes seconds there, minutes on a CPU), then
    moved to host memory; the draws, and so the weights, differ between the two for one seed.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    head_dim = shape.hidden // shape.heads

    def normal(*dims: int) -> torch.Tensor:
        drawn = torch.randn(*dims, generator=gen, device=device, dtype=torch.float32) * 0.02
        return drawn.to(dtype).cpu()

    w = {"model.embed_tokens.weight": normal(shape.vocab, shape.hidden)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(shape.heads * head_dim, shape.hidden)
        w[p + "self_attn.k_proj.weight"] = normal(shape.kv_heads * head_dim, shape.hidden)
        w[p + "self_attn.v_proj.weight"] = normal(shape.kv_heads * head_dim, shape.hidden)
        w[p + "self_attn.o_proj.weight"] = normal(shape.hidden, shape.heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = normal(shape.intermediate, shape.hidden)
        w[p + "mlp.up_proj.weight"] = normal(shape.intermediate, shape.hidden)
        w[p + "mlp.down_proj.weight"] = normal(shape.hidden, shape.intermediate)
        w[p + "input_layernorm.weight"] = torch.ones(shape.hidden, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(shape.hidden, dtype=dtype)
    w["model.norm.weight"] = torch.ones(shape.hidden, dtype=dtype)
    w["lm_head.weight"] = normal(shape.vocab, shape.hidden)
    return w


def make_family(
    family: str, size: str, replicas: int, out: str | os.PathLike, seed: int = 0
) -> Registry:
    """Generate ``replicas`` models of one family under ``out`` and merge them into its registry.

    Returns the registry of this family's models. Existing replica folders are kept; one made
    with a different shape is an error rather than a silent mix within a family.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    shape = SIZES[size]
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    tokenizer = _family_tokenizer(family, shape, out, replicas)
    config = llama_config(shape, tokenizer)
    specs = []
    for i in range(replicas):
        name = f"{family}-{i}"
        path = os.path.join(out, name)
        if os.path.isdir(path):
            _check_config(path, config)
        else:
            _write_replica(path, config, shape, tokenizer, seed + i)
        specs.append(ModelSpec(name=name, family=family, nbytes=weights_nbytes(path), path=path))
    family_registry = Registry(specs)
    _merge_registry(os.path.join(out, REGISTRY_FILE), family_registry)
    return family_registry


def ensure_default_models(models_dir: str | os.PathLike) -> Registry:
    """Make the default families (``DEFAULT_FAMILIES``) if missing; return the whole registry."""
    for family, size, replicas in DEFAULT_FAMILIES:
        make_family(family, size, replicas, models_dir)
    return Registry.from_yaml(os.path.join(models_dir, REGISTRY_FILE))


def _family_tokenizer(family: str, shape: Shape, out: str, replicas: int) -> Tokenizer:
    """The family's tokenizer: the one an existing replica has, else a newly trained one."""
    for i in range(replicas):
        existing = os.path.join(out, f"{family}-{i}", "tokenizer.json")
        if os.path.isfile(existing):
            return Tokenizer.from_file(existing)
    return train_tokenizer(shape.vocab)


def _check_config(path: str, config: dict) -> None:
    with open(os.path.join(path, "config.json")) as f:
        existing = json.load(f)
    if existing != config:
        raise ValueError(f"{path} exists with a different shape; remove it or use another --out")


def _write_replica(path: str, config: dict, shape: Shape, tokenizer: Tokenizer, seed: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    save_tokenizer(tokenizer, tmp, shape.max_len)
    save_file(random_weights(shape, seed), os.path.join(tmp, WEIGHTS_FILE), {"format": "pt"})
    os.replace(tmp, path)


def _merge_registry(path: str, new: Registry) -> None:
    """Write ``new`` into the registry at ``path``, replacing entries of the same name."""
    models = dict(Registry.from_yaml(path)) if os.path.exists(path) else {}
    models.update(new)
    Registry(models.values()).to_yaml(path)
