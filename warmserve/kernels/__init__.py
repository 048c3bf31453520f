"""Zero-copy memory switching: model weights and KV cache share one pool of physical chunks.

``MemorySwitcher`` maps pool chunks behind tagged regions (CUDA VMM on a GPU, a memfd on the
host); ``store_tensors`` / ``TensorLayout`` pack a model's tensors into one region; and
``bind_module`` points a module's parameters at those views, so activation copies nothing.
A ``Slot`` (``MemorySwitcher.slot``) is a fixed address range that shows one resident region at a
time, so a CUDA graph captured over it replays on whichever model is bound.
"""

from warmserve.kernels.switcher import MemorySwitcher, OutOfChunks, Region, Slot
from warmserve.kernels.tensor_layout import (
    TensorLayout,
    TensorSlot,
    bind_module,
    module_specs,
    store_tensors,
)

__all__ = [
    "MemorySwitcher",
    "OutOfChunks",
    "Region",
    "Slot",
    "TensorLayout",
    "TensorSlot",
    "bind_module",
    "module_specs",
    "store_tensors",
]
