"""One picture of the cluster as WarmServe sees it, shared by the page, /metrics and the CLI.

It is built only from public state: the extension's accounting (``extension.state``), its
``status()`` answer (the short-average load), the policy's ``forecast()`` when the policy has one,
and the device memory each worker reports in its heartbeat metrics (``WorkerState.metrics``).
Building it does no I/O, so it is cheap enough to run every second on the scheduler's loop. The
dataclasses turn into plain dicts so the same picture reaches ``warmserve status`` over a comm.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from distributed import Scheduler

from warmserve.policy.state import Tier

WORKER_METRICS = "warmserve"  # the worker plugin's key in its heartbeat metrics


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device: its mode, the models in its memory with their tier, and its memory."""

    id: str
    node: str
    worker: str | None
    mode: str
    memory: int
    used: int | None  # None until the worker's heartbeat has said
    lent: int
    models: dict[str, str]  # model -> tier name (device, engine or active), warmest first


@dataclass(frozen=True, slots=True)
class ModelView:
    """One model: load now, the forecast the planner plans for, and where it is."""

    name: str
    family: str
    load: float
    forecast_avg: float | None  # None when the policy makes no forecast
    forecast_peak: float | None
    instances: int
    starting: int
    queued: int
    host_nodes: tuple[str, ...]  # nodes holding its weights in host memory


@dataclass(frozen=True, slots=True)
class ClusterView:
    time: float
    policy: str
    devices: tuple[DeviceView, ...]
    models: tuple[ModelView, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterView:
        """The inverse of :meth:`to_dict`, also for what msgpack turned into lists."""
        return cls(
            time=float(d["time"]),
            policy=str(d["policy"]),
            devices=tuple(DeviceView(**dev) for dev in d["devices"]),
            models=tuple(
                ModelView(**{**m, "host_nodes": tuple(m["host_nodes"])}) for m in d["models"]
            ),
        )


def reported_memory(scheduler: Scheduler) -> dict[str, tuple[int, int]]:
    """Device id -> (used, lent) bytes from the workers' last heartbeats."""
    out = {}
    for ws in scheduler.workers.values():
        report = ws.metrics.get(WORKER_METRICS)
        if not isinstance(report, Mapping):
            continue
        for d in report.get("devices", ()):
            out[d["id"]] = (int(d["memory"]) - int(d["free"]), int(d.get("lent", 0)))
    return out


def forecast(policy: Any, now: float) -> dict[str, tuple[float, float]]:
    """(average, peak) per model the policy plans for; empty for a policy without a forecast
    (the baselines only react to load)."""
    fn = getattr(policy, "forecast", None)
    return dict(fn(now)) if callable(fn) else {}


def build_view(scheduler: Scheduler, extension: Any, now: float) -> ClusterView:
    """The picture of ``extension`` (a :class:`WarmServeExtension`) at time ``now``."""
    status = extension.status()
    snap = extension.state.snapshot(now, status["load"])
    memory = reported_memory(scheduler)
    devices = []
    for d in snap.devices:
        tiers = {m: snap.tier(m, d.id) for m in sorted(snap.models)}
        used, lent = memory.get(d.id, (None, d.lent))
        devices.append(
            DeviceView(
                id=d.id,
                node=d.node,
                worker=extension.state.worker_of(d.id),
                mode=snap.mode(d.id).value,
                memory=d.memory,
                used=used,
                lent=lent,
                models={
                    m: t.name.lower()
                    for m, t in sorted(tiers.items(), key=lambda mt: -mt[1])
                    if t >= Tier.DEVICE
                },
            )
        )
    fc = forecast(extension.policy, now)
    instances = Counter(i["model"] for i in status["instances"])
    starting = Counter(s["model"] for s in status["starting"])
    models = [
        ModelView(
            name=name,
            family=spec.family,
            load=float(status["load"].get(name, 0.0)),
            forecast_avg=fc[name][0] if name in fc else None,
            forecast_peak=fc[name][1] if name in fc else None,
            instances=instances.get(name, 0),
            starting=starting.get(name, 0),
            queued=int(status["queued"].get(name, 0)),
            host_nodes=tuple(sorted(n for n, ms in snap.host_cache.items() if name in ms)),
        )
        for name, spec in sorted(snap.models.items())
    ]
    return ClusterView(now, status["policy"], tuple(devices), tuple(models))
