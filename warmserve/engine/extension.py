"""The worker extension vLLM mixes into its worker: switch a model's weights in place.

vLLM names it by import path (``worker_extension_cls``), so this module must stay importable on
its own. A switch from tensors already in memory (the device pool or host memory) is a copy plan
(:mod:`warmserve.engine.copy_plan`): one copy per checkpoint tensor into the parameters, which keep
their addresses, so captured CUDA graphs stay valid. Where the backend repacked the parameters
(vLLM's CPU backend does: a loaded parameter can have zero elements) there is no plan and the
switch goes through vLLM's ``reload_weights`` with the checkpoint-format tensors, as does a
switch from disk.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from warmserve.engine import copy_plan

EXTENSION_CLS = "warmserve.engine.extension.WeightSwitchExtension"

logger = logging.getLogger("warmserve.engine")


class WeightSwitchExtension:
    """Methods added to vLLM's worker; called through ``collective_rpc`` by name."""

    def warmserve_switch_weights(
        self,
        weights: Mapping[str, torch.Tensor] | None,
        path: str,
        use_plan: bool = True,
    ) -> str:
        """Load a model of the same family: from ``weights`` if given, else from ``path``.

        Returns how: ``"copy"`` (the copy plan) or ``"reload"`` (vLLM's ``reload_weights``);
        ``use_plan=False`` forces the latter (benchmarks compare them). Tensors are read, not
        kept: the caller may reuse their memory once this returns.
        """
        model = self.model_runner.get_model()
        if weights is not None and use_plan:
            plan = self._warmserve_plan(model, weights)
            if plan is not None:
                copy_plan.apply(plan, dict(model.named_parameters()), weights)
                if torch.cuda.is_available():
                    torch.cuda.current_stream().synchronize()
                return "copy"
        if weights is None:
            self.model_runner.reload_weights(weights_path=path)
        else:
            self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        return "reload"

    def warmserve_weight_bytes(self) -> int:
        """Bytes of the loaded model's parameters, as laid out in the engine."""
        model = self.model_runner.get_model()
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def _warmserve_plan(
        self, model: torch.nn.Module, weights: Mapping[str, torch.Tensor]
    ) -> tuple[copy_plan.Copy, ...] | None:
        """The copy plan for checkpoints shaped as ``weights``, made once per shape."""
        checkpoint = copy_plan.specs(weights)
        key = tuple(checkpoint.items())
        plans = self.__dict__.setdefault("_warmserve_plans", {})
        if key not in plans:
            try:
                plans[key] = copy_plan.plan_copies(
                    copy_plan.specs(dict(model.named_parameters())),
                    checkpoint,
                    getattr(model, "packed_modules_mapping", {}),
                )
            except copy_plan.NoPlan as e:
                logger.debug("switches go through reload_weights: %s", e)
                plans[key] = None
        return plans[key]
