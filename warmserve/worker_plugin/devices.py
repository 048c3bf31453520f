"""Which devices a worker owns: GPUs when it has them, else CPU slots with a memory budget.

A device id is ``f"{node}/{kind}:{index}"``, unique in the cluster as long as node names are, and
the same string the scheduler plugin puts in its :class:`~warmserve.policy.state.DeviceSnapshot`.
GPU discovery asks NVML (``nvidia-ml-py``) for memory sizes and honours ``CUDA_VISIBLE_DEVICES``;
without NVML a listed GPU gets the configured memory budget.

A worker process that owns exactly one GPU ``cuda:N`` (``warmserve up`` starts one per GPU) pins
itself to it: its preload sets ``CUDA_VISIBLE_DEVICES=N`` before anything initialises CUDA
(:func:`pin_cuda`), because vLLM and torch run an engine on the first GPU they see. Its device
keeps ``index`` N, so two such workers on one node have distinct ids, and gets ``local_index`` 0,
the index CUDA calls in the process take. Nothing here imports torch or initialises CUDA.
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
UP_CPU_SLOTS = 2  # CPU slots (one worker each) `warmserve up` starts when it sees no GPU


@dataclass(frozen=True, slots=True)
class Device:
    """One device: ``kind`` ``"cuda"`` (a GPU) or ``"cpu"`` (a slot of host memory).

    ``index`` is the one in the device's id, cluster-wide; ``local_index`` is the one this process
    passes to CUDA (default: ``index``). They differ only in a process pinned to its one GPU,
    where ``cuda:N`` is the process's cuda:0. A worker owning several GPUs sees them all with the
    indices of its ``CUDA_VISIBLE_DEVICES``, and an engine there must be given its device: it would
    take the first one otherwise (engines spanning GPUs, tensor parallelism, are a later issue).
    """

    node: str
    kind: str
    index: int
    memory: int
    local_index: int | None = None

    def __post_init__(self) -> None:
        if self.local_index is None:
            object.__setattr__(self, "local_index", self.index)

    @property
    def id(self) -> str:
        return f"{self.node}/{self.kind}:{self.index}"


def node_name(name: str | None = None) -> str:
    """The node name: the flag, else ``warmserve.worker.node``, else the hostname."""
    return name or settings.get("node") or socket.gethostname()


def parse_list(spec: str) -> list[tuple[str, int]]:
    """``(kind, index)`` pairs from a list like ``"cpu:0,cpu:1"`` or ``"cuda:0,cuda:1"``."""
    items = []
    for item in spec.split(","):
        kind, _, index = item.strip().partition(":")
        if kind not in KINDS or not (index.isascii() and index.isdigit()):
            raise ValueError(f"bad device {item.strip()!r}: expected cpu:N or cuda:N")
        if (kind, int(index)) in items:
            raise ValueError(f"{kind}:{int(index)} listed twice in {spec!r}")
        items.append((kind, int(index)))
    return items


def expand_devices(spec: str | int | None, gpus: int | None = None) -> list[str]:
    """One device per worker from ``warmserve up --devices``, as ``--warmserve-devices`` takes it.

    ``spec`` is a count of CPU slots (``"2"``: cpu:0 and cpu:1), ``"cuda"`` (every visible GPU),
    or a list (``"cuda:0,cuda:1"``, ``"cpu:0,cpu:1"``); None means the visible GPUs if there are
    any, else :data:`UP_CPU_SLOTS` CPU slots. ``gpus`` is how many GPUs are visible (None: ask
    NVML, only for ``"cuda"`` and None). A bad ``spec`` raises ValueError, worded for the user.
    """
    text = None if spec is None else str(spec).strip()
    if text is None or text == "cuda":
        count = _visible_gpus() if gpus is None else gpus
        if count:
            return [f"cuda:{i}" for i in range(count)]
        if text is not None:
            raise ValueError("no GPU visible (NVML found none); use a count of CPU slots")
        return [f"cpu:{i}" for i in range(UP_CPU_SLOTS)]
    if text.isascii() and text.isdigit():
        if int(text) < 1:
            raise ValueError("a count of CPU slots must be at least 1")
        return [f"cpu:{i}" for i in range(int(text))]
    if ":" not in text:
        raise ValueError(
            f"{text!r} is not a count of CPU slots (e.g. 2), cuda (every visible GPU) "
            "or a list of devices (e.g. cuda:0,cuda:1 or cpu:0,cpu:1)"
        )
    return [f"{kind}:{index}" for kind, index in parse_list(text)]


def cuda_pin(spec: str | None, visible: str | None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` a process owning ``spec``'s devices sets, or None: leave it.

    ``visible`` is the variable's current value (None: unset). A process owning exactly one GPU
    ``cuda:N`` pins itself to it: ``"N"`` with the variable unset, else the N-th entry it lists
    (``cuda:N`` always meant the N-th visible GPU), so that ``warmserve up`` under
    ``CUDA_VISIBLE_DEVICES=2,3`` runs one worker on each. A process owning several GPUs (see
    :class:`Device`) or none, one with no ``spec`` (it takes every visible GPU), or one whose
    ``N`` the variable does not list (it pinned itself already) leaves the variable alone.
    """
    if spec is None:
        return None
    gpus = [index for kind, index in parse_list(spec) if kind == "cuda"]
    if len(gpus) != 1:
        return None
    if visible is None:
        return str(gpus[0])
    listed = [v.strip() for v in visible.split(",") if v.strip()]
    return listed[gpus[0]] if gpus[0] < len(listed) else None


def pin_cuda(spec: str | None) -> bool:
    """Set this process's ``CUDA_VISIBLE_DEVICES`` as :func:`cuda_pin` says; True if it did.

    Must run before anything in the process initialises CUDA (torch counts the GPUs once): the
    worker preload calls it first thing, before the plugin imports torch and vLLM.
    """
    value = cuda_pin(spec, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if value is None:
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = value
    logger.info("Pinned to GPU %s: CUDA_VISIBLE_DEVICES=%s", value, value)
    return True


def parse_devices(
    spec: str, node: str, memory: int | None = None, pinned: bool = False
) -> list[Device]:
    """Devices from a flag like ``"cpu:0,cpu:1"`` or ``"cuda:0,cuda:1"``.

    ``memory`` overrides every device's budget; otherwise GPUs take
    ``warmserve.worker.gpu-memory`` if set, else what NVML says they have, and CPU slots take
    ``warmserve.worker.device-memory``. ``pinned``: the process pinned itself to the one GPU of
    ``spec`` (:func:`pin_cuda`), which it sees as cuda:0.
    """
    devices = []
    gpu_memory = settings.get("gpu-memory")
    for kind, index in parse_list(spec):
        local = 0 if pinned and kind == "cuda" else index
        mem = memory
        if not mem and kind == "cuda":
            mem = int(parse_bytes(gpu_memory)) if gpu_memory else _gpu_memory(local)
        budget = mem or settings.get_bytes("device-memory")
        devices.append(Device(node, kind, index, budget, local))
    return devices


def discover(
    spec: str | None = None,
    node: str | None = None,
    memory: str | int | None = None,
    pinned: bool = False,
) -> list[Device]:
    """This worker's devices: the ``spec`` flag if given, else visible GPUs, else CPU slots."""
    node = node_name(node)
    mem = int(parse_bytes(memory)) if memory else None
    if spec:
        return parse_devices(spec, node, mem, pinned)
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
