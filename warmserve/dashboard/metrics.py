"""WarmServe's Prometheus metrics on the scheduler's own ``/metrics``.

Dask's HTTP server serves ``prometheus_client``'s global registry there, so WarmServe registers
one collector in it, as distributed does for its scheduler metrics: one per process, pointed at
the scheduler installed last (tests start several in one process). Every scrape reads the
observer's latest picture (at most a sampling interval old) and its counters; nothing is kept
here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import prometheus_client
from distributed import Scheduler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from warmserve.dashboard.observer import NAME as OBSERVER
from warmserve.dashboard.observer import Observer
from warmserve.policy.state import DeviceMode


class WarmServeCollector:
    """Device states, resident models per tier, per-model load and forecast, prewarm hits and
    misses, and bytes moved per tier, for the scheduler in :attr:`scheduler`."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on the scheduler scraped, not on registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        observer = self.scheduler.extensions.get(OBSERVER)
        if not isinstance(observer, Observer):
            return
        view = observer.view
        if view is None:
            return

        modes = Counter(d.mode for d in view.devices)
        devices = GaugeMetricFamily("warmserve_devices", "Devices by state.", labels=["state"])
        for mode in DeviceMode:
            devices.add_metric([mode.value], modes.get(mode.value, 0))
        yield devices

        memory = GaugeMetricFamily(
            "warmserve_device_memory_bytes",
            "Memory of each device: its budget, what is in use, what is lent out of its KV space.",
            labels=["device", "kind"],
        )
        for d in view.devices:
            memory.add_metric([d.id, "total"], d.memory)
            if d.used is not None:
                memory.add_metric([d.id, "used"], d.used)
            memory.add_metric([d.id, "lent"], d.lent)
        yield memory

        tiers = Counter(t for d in view.devices for t in d.models.values())
        tiers["host"] = sum(len(m.host_nodes) for m in view.models)
        resident = GaugeMetricFamily(
            "warmserve_resident_models",
            "Model copies by warmth tier: (model, device) pairs in device memory, (model, node) "
            "pairs in host memory.",
            labels=["tier"],
        )
        for tier in ("host", "device", "engine", "active"):
            resident.add_metric([tier], tiers.get(tier, 0))
        yield resident

        load = GaugeMetricFamily(
            "warmserve_model_load", "Short-average concurrent requests.", labels=["model"]
        )
        fc = GaugeMetricFamily(
            "warmserve_model_forecast",
            "Concurrent requests the planner plans for (window now open or next, larger).",
            labels=["model", "stat"],
        )
        instances = GaugeMetricFamily(
            "warmserve_model_instances", "Serving instances.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "warmserve_model_queued",
            "Requests the scheduler has no instance slot for yet.",
            labels=["model"],
        )
        for m in view.models:
            load.add_metric([m.name], m.load)
            if m.forecast_avg is not None and m.forecast_peak is not None:
                fc.add_metric([m.name, "avg"], m.forecast_avg)
                fc.add_metric([m.name, "peak"], m.forecast_peak)
            instances.add_metric([m.name], m.instances)
            queued.add_metric([m.name], m.queued)
        yield from (load, fc, instances, queued)

        hits = CounterMetricFamily(
            "warmserve_prewarm_hits",
            "Activations that found the model's weights already in device memory.",
            labels=["model"],
        )
        misses = CounterMetricFamily(
            "warmserve_prewarm_misses",
            "Activations that loaded the model's weights from host memory or disk.",
            labels=["model"],
        )
        counts = observer.prewarm_hits()
        for m in view.models:
            h, n = counts.get(m.name, (0, 0))
            hits.add_metric([m.name], h)
            misses.add_metric([m.name], n)
        yield from (hits, misses)

        activations = CounterMetricFamily(
            "warmserve_activations",
            "Instances started, by the tier the model started from.",
            labels=["model", "from_tier"],
        )
        for (model, tier), n in sorted(observer.activations.items()):
            activations.add_metric([model, tier], n)
        yield activations

        moved = CounterMetricFamily(
            "warmserve_bytes_moved",
            "Weight bytes moved into each tier, by cause (model bytes per completed prewarm "
            "job and device, and per activation that was not prewarmed).",
            labels=["tier", "cause"],
        )
        for tier, cause in (("host", "prewarm"), ("device", "prewarm"), ("device", "activation")):
            moved.add_metric([tier, cause], observer.bytes_moved.get((tier, cause), 0))
        yield moved


_collector: WarmServeCollector | None = None


def register(scheduler: Scheduler) -> WarmServeCollector:
    """Point this process's collector at ``scheduler``, registering it on first use."""
    global _collector
    if _collector is None:
        _collector = WarmServeCollector(scheduler)
        prometheus_client.REGISTRY.register(_collector)
    _collector.scheduler = scheduler
    return _collector
