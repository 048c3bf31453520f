"""Which devices a worker owns: GPUs when it has them, else CPU slots with a memory budget.

A device id is ``f"{node}/{kind}:{index}"``, unique in the cluster as long as node names are, and
the same string the scheduler plugin puts in its :class:`~warmserve.policy.state.DeviceSnapshot`.
GPU discovery asks NVML (``nvidia-ml-py``) for memory sizes and honours ``CUDA_VISIBLE_DEVICES``;
without NVML a listed GPU gets the configured memory budget.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from dask.utils import parse_bytes

from warmserve.worker_plugin import settings

logger = logging.getLogger("warmserve.worker.devices")

KINDS = ("cpu", "cuda")


@dataclass(frozen=True, slots=True)
class Device:
    """One device: ``kind`` ``"cuda"`` (a GPU, ``index`` as the process sees it) or ``"cpu"``."""

    node: str
    kind: str
    index: int
    memory: int

    @property
    def id(self) -> str:
        return f"{self.node}/{self.kind}:{self.index}"


def node_name(name: str | None = None) -> str:
    """The node name: the flag, else ``warmserve.worker.node``, else the hostname."""
    return name or settings.get("node") or socket.gethostname()


def parse_devices(spec: str, node: str, memory: int | None = None) -> list[Device]:
    """Devices from a flag like ``"cpu:0,cpu:1"`` or ``"cuda:0,cuda:1"``.

    ``memory`` overrides every device's budget; otherwise GPUs ask NVML and CPU slots take
    ``warmserve.worker.device-memory``.
    """
    devices = []
    for item in spec.split(","):
        kind, _, index = item.strip().partition(":")
        if kind not in KINDS or not index.isdigit():
            raise ValueError(f"bad device {item!r}: expected cpu:N or cuda:N")
        mem = memory or (_gpu_memory(int(index)) if kind == "cuda" else None)
        devices.append(Device(node, kind, int(index), mem or settings.get_bytes("device-memory")))
    if len({d.id for d in devices}) != len(devices):
        raise ValueError(f"device listed twice in {spec!r}")
    return devices


def discover(spec: str | None = None, node: str | None = None, memory: str | int | None = None):
    """This worker's devices: the ``spec`` flag if given, else visible GPUs, else CPU slots."""
    node = node_name(node)
    mem = int(parse_bytes(memory)) if memory else None
    if spec:
        return parse_devices(spec, node, mem)
    gpus = _visible_gpus()
    if gpus:
        return parse_devices(",".join(f"cuda:{i}" for i in range(gpus)), node, mem)
    slots = int(settings.get("cpu-slots"))
    return parse_devices(",".join(f"cpu:{i}" for i in range(slots)), node, mem)


def _visible_gpus() -> int:
    """How many GPUs this process may use (0 without NVML or without GPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return 0


def _gpu_memory(index: int) -> int | None:
    """Total memory of the ``index``-th visible GPU from NVML, or None if NVML cannot say."""
    try:
        import pynvml
    except ImportError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        pynvml.nvmlInit()
        if visible:
            physical = visible.split(",")[index].strip()
            handle = (
                pynvml.nvmlDeviceGetHandleByUUID(physical)
                if physical.startswith(("GPU-", "MIG-"))
                else pynvml.nvmlDeviceGetHandleByIndex(int(physical))
            )
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except (pynvml.NVMLError, IndexError, ValueError):
        logger.debug("NVML cannot size cuda:%d", index, exc_info=True)
        return None
