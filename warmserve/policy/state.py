"""The contract between the policy and whoever enacts it (scheduler plugin or simulator).

The caller builds an immutable :class:`ClusterSnapshot` of what is true now; a policy returns a
list of typed actions (NamedTuples, like ``distributed.active_memory_manager.Suggestion``). The
policy never mutates the snapshot and keeps no reference to it, so the same snapshot and history
always give the same actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from warmserve.registry import ModelSpec

if TYPE_CHECKING:  # config imports this module
    from warmserve.policy.config import PolicyConfig


class Tier(IntEnum):
    """Warmth of a model on a device, coldest first; activation cost falls tier by tier."""

    DISK = 0  # weights only on the node's disk
    HOST = 1  # weights in the node's host memory
    DEVICE = 2  # weights in device memory, no engine of the family on the device
    ENGINE = 3  # weights in device memory and an engine of the model's family is up there
    ACTIVE = 4  # an instance of the model serves on the device


class DeviceMode(StrEnum):
    """What a device is doing: nothing, holding prewarmed weights, or serving an instance."""

    IDLE = "idle"
    UNIVERSAL = "universal"
    DEDICATED = "dedicated"


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """One device (a GPU, or a CPU slot with a memory budget).

    ``resident`` are models whose weights sit in device memory without serving (prewarmed);
    ``engines`` are model families with an engine up on the device (an engine can switch among
    the models of its family in place). ``lent`` is KV space of a dedicated device currently lent
    to prewarmed weights.
    """

    id: str
    node: str
    memory: int
    resident: tuple[str, ...] = ()
    engines: tuple[str, ...] = ()
    lent: int = 0


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """A serving instance of ``model`` on its tensor-parallel group ``devices``."""

    id: str
    model: str
    devices: tuple[str, ...]
    load: float = 0.0  # concurrent requests now
    # Time the instance began serving; for one still starting, when it will (the simulator) or
    # the snapshot's time (the scheduler plugin, which cannot know): never before ``time``.
    started: float = 0.0


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Everything a policy may look at, at time ``time`` (seconds)."""

    time: float
    models: Mapping[str, ModelSpec]
    devices: tuple[DeviceSnapshot, ...]
    instances: tuple[InstanceSnapshot, ...] = ()
    host_cache: Mapping[str, frozenset[str]] = field(default_factory=dict)  # node -> models
    # model -> short-average concurrency of every request from its arrival, queued ones included
    load: Mapping[str, float] = field(default_factory=dict)
    # model -> requests waiting for a slot, less those holding one on an instance being started
    queued: Mapping[str, int] = field(default_factory=dict)

    def device(self, device_id: str) -> DeviceSnapshot:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(device_id)

    def mode(self, device_id: str) -> DeviceMode:
        """Derive a device's mode: dedicated if an instance uses it, universal if weights sit."""
        if any(device_id in i.devices for i in self.instances):
            return DeviceMode.DEDICATED
        if self.device(device_id).resident:
            return DeviceMode.UNIVERSAL
        return DeviceMode.IDLE

    def tier(self, model: str, device_id: str) -> Tier:
        """How warm ``model`` is on one device."""
        if any(i.model == model and device_id in i.devices for i in self.instances):
            return Tier.ACTIVE
        d = self.device(device_id)
        if model in d.resident:
            family = self.models[model].family
            return Tier.ENGINE if family in d.engines else Tier.DEVICE
        if model in self.host_cache.get(d.node, frozenset()):
            return Tier.HOST
        return Tier.DISK


class Prewarm(NamedTuple):
    """Move ``model``'s weights up to ``tier`` on ``devices`` (its TP group) ahead of load.

    ``tier`` is HOST to stage into the node's host memory, DEVICE (or ENGINE) for device memory.
    """

    model: str
    devices: tuple[str, ...]
    tier: Tier = Tier.DEVICE


class Evict(NamedTuple):
    """Drop ``model``'s prewarmed weights from ``devices`` (down to host memory or disk)."""

    model: str
    devices: tuple[str, ...]


class Start(NamedTuple):
    """Start an instance of ``model`` on ``devices`` from the warmest tier available there."""

    model: str
    devices: tuple[str, ...]


class Stop(NamedTuple):
    """Stop serving instance ``instance``; its weights may stay resident (caller's choice)."""

    instance: str


class LendKV(NamedTuple):
    """A dedicated device lends ``nbytes`` of unused KV space to prewarmed weights."""

    device: str
    nbytes: int


class ReclaimKV(NamedTuple):
    """Take back ``nbytes`` of lent KV space (prewarmed weights in it get an Evict first)."""

    device: str
    nbytes: int


Action = Prewarm | Evict | Start | Stop | LendKV | ReclaimKV


class Policy(Protocol):
    """What the scheduler plugin and the simulator call. Implementations are deterministic."""

    name: str
    config: PolicyConfig

    def prepare(self) -> None:
        """Slow work done once before the first use (compiling the forecaster's kernels). The
        live scheduler runs it in a thread at start, and uses the policy only once it is done;
        the simulator does not call it (the first use does the same work)."""

    def observe(self, model: str, window: int, avg: float, peak: float) -> None:
        """Record the closed load window ``window`` of ``model`` (average and peak concurrency)."""

    def plan(self, snapshot: ClusterSnapshot) -> list[Action]:
        """The periodic tick: forecast, prewarm, evict, scale. Actions are enacted in order."""

    def on_demand(self, snapshot: ClusterSnapshot, model: str) -> list[Action]:
        """A request for ``model`` found no instance with room: what to do right now."""
