"""Policies by name, for the simulator's and the scheduler plugin's configuration.

``warmserve`` is the full system; ``autoscale`` and ``share`` are the ServerlessLLM- and
MuxServe-style baselines; the ``warmserve-no*`` names are the paper's ablations. The forecast
window (the paper's 3/5/40-minute comparison) is ``config.window``.
"""

from __future__ import annotations

from collections.abc import Mapping

from warmserve.policy.baselines import AutoscalePolicy, SharePolicy
from warmserve.policy.config import PolicyConfig
from warmserve.policy.planner import WarmServePolicy
from warmserve.policy.state import Policy
from warmserve.registry import ModelSpec

_ABLATIONS: dict[str, dict[str, bool]] = {
    "warmserve": {},
    "warmserve-noprewarm": {"prewarm": False},
    "warmserve-noplacement": {"placement": False},
    "warmserve-noproactive": {"proactive": False},
    "warmserve-nolend": {"lend": False},
}

POLICIES: tuple[str, ...] = (*_ABLATIONS, "autoscale", "share")


def make_policy(
    name: str, models: Mapping[str, ModelSpec], config: PolicyConfig | None = None
) -> Policy:
    """A fresh policy called ``name`` over ``models``; ValueError for an unknown name."""
    config = config or PolicyConfig()
    if name in _ABLATIONS:
        return WarmServePolicy(models, config, name=name, **_ABLATIONS[name])
    if name == "autoscale":
        return AutoscalePolicy(models, config)
    if name == "share":
        return SharePolicy(models, config)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
