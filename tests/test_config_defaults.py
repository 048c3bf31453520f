"""One place for defaults (issue 24): ``warmserve/warmserve.yaml``. The policy's and the engine's
dataclasses take theirs from it, and a key it does not have is an error that names the key."""

from __future__ import annotations

import dataclasses

import pytest

from warmserve import defaults
from warmserve.defaults import ConfigError
from warmserve.policy.config import PolicyConfig, check_fields


def test_every_policy_field_has_its_default_in_the_yaml() -> None:
    check_fields()
    assert PolicyConfig() == PolicyConfig.from_mapping(defaults.document())
    assert PolicyConfig().window == float(defaults.get("forecast.window"))
    assert PolicyConfig().share_slots == defaults.get("policy.share-slots")


def test_the_engine_takes_its_defaults_from_the_yaml() -> None:
    engine = pytest.importorskip("warmserve.engine.engine")
    config = engine.EngineConfig()
    assert config.max_model_len == defaults.get("engine.max-model-len")
    assert config.max_num_seqs == defaults.get("planner.instance-capacity")
    assert config.dtype == defaults.get("engine.dtype")
    assert config.kv_cache_bytes == 256 * 2**20  # worker.engine-kv: 256MiB


def test_keys_are_read_with_dashes_or_underscores_and_converted() -> None:
    config = PolicyConfig.from_mapping(
        {"warmserve": {"planner": {"instance_capacity": 8, "tick": "2"}, "forecast": {}}}
    )
    assert config.instance_capacity == 8 and config.tick == 2.0
    kv = PolicyConfig.from_mapping({"policy": {"kv-bytes": {"model-a": 10}}}).kv_bytes
    assert kv == {"model-a": 10}  # the keys of kv-bytes are model names, not settings


@pytest.mark.parametrize(
    ("tree", "named"),
    [
        ({"planner": {"tik": 5}}, "warmserve.planner.tik"),
        ({"policy": {"window": 600}}, "warmserve.policy.window"),  # a key of another section
        ({"autoscaler": {"scale-up": 0.9, "scale_dwn": 0.2}}, "warmserve.autoscaler.scale-dwn"),
    ],
)
def test_an_unknown_policy_key_is_an_error_naming_it(tree: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        PolicyConfig.from_mapping(tree)


@pytest.mark.parametrize(
    ("tree", "named"),
    [
        ({"planner": {"tick": "soon"}}, "warmserve.planner.tick: could not convert"),
        ({"forecast": {"periods": 2.5}}, "warmserve.forecast.periods: expected a whole number"),
        ({"policy": {"kv-bytes": 3}}, "warmserve.policy.kv-bytes: expected a mapping"),
    ],
)
def test_a_bad_policy_value_is_an_error_naming_its_key(tree: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        PolicyConfig.from_mapping(tree)


def test_unknown_keys_anywhere_in_the_tree() -> None:
    tree = defaults.document()["warmserve"]
    assert defaults.unknown_keys(tree) == []
    tree["frontdoor"]["maxqueue"] = 3
    tree["engine"]["max_model_len"] = 1024  # an environment variable's spelling: known
    tree["nope"] = {"deep": 1}
    tree["policy"]["kv-bytes"] = {"any-model": 1}
    assert defaults.unknown_keys(tree) == ["frontdoor.maxqueue", "nope"]
    with pytest.raises(ConfigError, match=r"warmserve\.frontdoor\.maxqueue, warmserve\.nope"):
        defaults.check_keys(tree)


def test_defaults_are_copies() -> None:
    defaults.section("frontdoor")["max-queue"] = -1
    assert defaults.get("frontdoor.max-queue") == 256
    assert dataclasses.replace(PolicyConfig()).kv_bytes is not PolicyConfig().kv_bytes
