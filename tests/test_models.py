"""``warmserve models make``: files vLLM and transformers can load, a registry, idempotence."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoTokenizer

from warmserve.models.cli import command
from warmserve.models.make import REGISTRY_FILE, SIZES, ensure_default_models, make_family
from warmserve.models.weights import load_weights, map_weights, read_layout, weights_nbytes
from warmserve.registry import Registry


def test_family_is_registered(tiny_registry: Registry, models_dir: str) -> None:
    assert list(tiny_registry) == ["tiny-0", "tiny-1", "tiny-2"]
    on_disk = Registry.from_yaml(os.path.join(models_dir, REGISTRY_FILE))
    for name, spec in tiny_registry.items():
        assert on_disk[name] == spec
        assert spec.family == "tiny" and spec.tp == 1
        assert spec.nbytes == weights_nbytes(spec.path)
        with open(os.path.join(spec.path, "config.json")) as f:
            assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_replicas_share_tokenizer_but_not_weights(tiny_registry: Registry) -> None:
    a, b = (
        load_file(os.path.join(tiny_registry[n].path, "model.safetensors"))
        for n in ("tiny-0", "tiny-1")
    )
    assert a.keys() == b.keys()
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    tokenizers = {_read(os.path.join(s.path, "tokenizer.json")) for s in tiny_registry.values()}
    assert len(tokenizers) == 1


def test_tokenizer_loads_with_chat_template(tiny_registry: Registry) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_registry["tiny-0"].path)
    text = "Return the sum of a list, then print(it) twice."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert max(ids) < SIZES["tiny"].vocab
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|assistant|>\n")


def test_make_is_idempotent_and_extends(tiny_registry: Registry, models_dir: str) -> None:
    weights = os.path.join(tiny_registry["tiny-0"].path, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    more = make_family("tiny", "tiny", replicas=4, out=models_dir)
    assert list(more) == ["tiny-0", "tiny-1", "tiny-2", "tiny-3"]
    assert os.stat(weights).st_mtime_ns == mtime
    with (
        open(os.path.join(more["tiny-3"].path, "tokenizer.json")) as f3,
        open(os.path.join(more["tiny-0"].path, "tokenizer.json")) as f0,
    ):
        assert f3.read() == f0.read()
    with pytest.raises(ValueError, match="different shape"):
        make_family("tiny", "mini", replicas=1, out=models_dir)


def test_host_weights_match_the_file(tiny_registry: Registry) -> None:
    path = tiny_registry["tiny-1"].path
    expected = load_file(os.path.join(path, "model.safetensors"))
    pool = torch.zeros(weights_nbytes(path) + 64, dtype=torch.uint8)
    into = load_weights(path, into=pool)
    mapped = map_weights(path)
    fresh = load_weights(path)
    for name, tensor in expected.items():
        for got in (into[name], mapped[name], fresh[name]):
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert into[name].untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    assert read_layout(path).nbytes == sum(t.nbytes for t in expected.values())
    with pytest.raises(ValueError):
        load_weights(path, into=torch.zeros(16, dtype=torch.uint8))


def test_cli_make_and_defaults(tmp_path) -> None:
    runner = CliRunner()
    out = os.fspath(tmp_path)
    result = runner.invoke(command, ["make", "--family", "x", "--replicas", "2", "--out", out])
    assert result.exit_code == 0, result.output
    assert "x-1" in result.output
    assert list(Registry.from_yaml(os.path.join(out, REGISTRY_FILE))) == ["x-0", "x-1"]
    registry = ensure_default_models(out)
    assert {f: len(m) for f, m in registry.families().items()} == {"x": 2, "tiny": 4, "mini": 3}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
