"""The worker extension vLLM mixes into its worker: switch a model's weights in place.

vLLM names it by import path (``worker_extension_cls``), so this module must stay importable on
its own. The switch goes through ``reload_weights`` with checkpoint-format tensors: on CPU vLLM
repacks some projections into kernel layouts after loading (the loaded parameter can have zero
elements), so copying into parameters directly would be wrong.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

EXTENSION_CLS = "warmserve.engine.extension.WeightSwitchExtension"


class WeightSwitchExtension:
    """Methods added to vLLM's worker; called through ``collective_rpc`` by name."""

    def warmserve_switch_weights(
        self, weights: Mapping[str, torch.Tensor] | None, path: str
    ) -> None:
        """Load a model of the same family: from ``weights`` if given, else from ``path``.

        Tensors are read, not kept: the caller may reuse their memory once this returns.
        """
        if weights is None:
            self.model_runner.reload_weights(weights_path=path)
        else:
            self.model_runner.reload_weights(weights_iterator=iter(weights.items()))

    def warmserve_weight_bytes(self) -> int:
        """Bytes of the loaded model's parameters, as laid out in the engine."""
        model = self.model_runner.get_model()
        return sum(p.numel() * p.element_size() for p in model.parameters())
