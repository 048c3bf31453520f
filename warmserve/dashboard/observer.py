"""The memory behind the WarmServe page and the scheduler's /metrics.

The extension keeps only the present (its accounting, the load of the last few seconds); the page
wants load against forecast over time and the last things done, and Prometheus wants counters
that only grow. The :class:`Observer` is a scheduler plugin of its own that samples the
extension's public state every second into bounded histories, and counts the worker plugin's
events (``"warmserve"`` topic: prewarm jobs, activations, deactivations) as they are logged, so
the extension does no bookkeeping for it. Evictions send no event; they are noticed as a model
leaving a device between two samples.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from distributed import Scheduler, SchedulerPlugin
from distributed.metrics import time
from tornado.ioloop import PeriodicCallback

from warmserve import protocol
from warmserve.dashboard.view import ClusterView, build_view

logger = logging.getLogger("warmserve.dashboard")

NAME = "warmserve-observer"
EXTENSION = "warmserve"  # the scheduler extension's name (scheduler_plugin.extension.NAME)
TOPIC = protocol.WORKER_TOPIC

WARM_TIERS = frozenset({"device", "engine"})  # an activation from these found prewarmed weights


@dataclass(frozen=True, slots=True)
class Sample:
    """One model's load and forecast at one time."""

    time: float
    load: float
    forecast_avg: float | None
    forecast_peak: float | None


@dataclass(frozen=True, slots=True)
class Happening:
    """Something done on a device, for the page's list of recent actions."""

    time: float
    action: str  # prewarm, evict, start, stop, engine died
    model: str
    where: str
    detail: str


class Observer(SchedulerPlugin):
    """Samples the WarmServe extension every ``interval`` seconds; keeps ``keep`` samples per
    model and the last ``actions`` happenings."""

    name = NAME

    def __init__(self, interval: float = 1.0, keep: int = 900, actions: int = 40) -> None:
        self.interval = interval
        self.view: ClusterView | None = None
        self.series: dict[str, deque[Sample]] = {}
        self.keep = keep
        self.happenings: deque[Happening] = deque(maxlen=actions)
        self.activations: Counter[tuple[str, str]] = Counter()  # (model, from tier)
        self.bytes_moved: Counter[tuple[str, str]] = Counter()  # (tier, cause)
        self.scheduler: Scheduler | None = None
        self._pc: PeriodicCallback | None = None

    async def start(self, scheduler: Scheduler) -> None:
        if self.scheduler is not None:  # started when registered, then with the other plugins
            return
        self.scheduler = scheduler
        scheduler.extensions[NAME] = self
        scheduler.handlers[protocol.SCHEDULER_OBSERVE] = self.observe
        self.sample()
        self._pc = PeriodicCallback(self.sample, self.interval * 1000.0)
        self._pc.start()

    async def close(self) -> None:
        if self._pc is not None:
            self._pc.stop()

    @property
    def extension(self) -> Any | None:
        """The WarmServe extension, or None on a scheduler without it."""
        return self.scheduler.extensions.get(EXTENSION) if self.scheduler else None

    # -- sampling ------------------------------------------------------------------------------

    def sample(self) -> ClusterView | None:
        """Take a picture now, append it to the histories and notice evictions."""
        extension = self.extension
        if extension is None:
            return None
        assert self.scheduler is not None
        try:
            view = build_view(self.scheduler, extension, time())
        except Exception:  # a half-updated worker must not stop the sampling
            logger.exception("WarmServe dashboard sample failed")
            return self.view
        for m in view.models:
            series = self.series.setdefault(m.name, deque(maxlen=self.keep))
            series.append(Sample(view.time, m.load, m.forecast_avg, m.forecast_peak))
        if self.view is not None:
            self._notice_evictions(self.view, view)
        self.view = view
        return view

    def _notice_evictions(self, before: ClusterView, after: ClusterView) -> None:
        now = {d.id: d.models for d in after.devices}
        for d in before.devices:
            for model in d.models:
                if d.id in now and model not in now[d.id]:
                    self.happenings.append(
                        Happening(after.time, "evict", model, d.id, f"was {d.models[model]}")
                    )

    # -- worker events -------------------------------------------------------------------------

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or not isinstance(msg, dict):
            return
        event = msg.get("event")
        model = str(msg.get("model", ""))
        if event == "activated":
            tier = str(msg.get("from_tier"))
            self.activations[model, tier] += 1
            if tier not in WARM_TIERS:
                self.bytes_moved["device", "activation"] += self._nbytes(model)
            self._happened(
                "start", model, msg.get("device"), f"from {tier} in {msg.get('seconds', 0):.2f} s"
            )
        elif event == "prewarm":
            devices = list(msg.get("devices") or ())
            tier = str(msg.get("tier"))
            if msg.get("state") == "done":
                into = "host" if tier == "host" else "device"
                self.bytes_moved[into, "prewarm"] += self._nbytes(model) * max(1, len(devices))
            where = ",".join(devices) or str(msg.get("worker", ""))
            self._happened("prewarm", model, where, f"to {tier}: {msg.get('state')}")
        elif event == "deactivated":
            self._happened("stop", model, msg.get("device"), str(msg.get("id", "")))
        elif event is not None:
            self._happened(str(event), model, msg.get("device") or msg.get("worker"), "")

    def _happened(self, action: str, model: str, where: Any, detail: str) -> None:
        self.happenings.append(Happening(time(), action, model, str(where or ""), detail))

    def _nbytes(self, model: str) -> int:
        extension = self.extension
        spec = extension.registry.get(model) if extension is not None else None
        return int(spec.nbytes) if spec is not None else 0

    # -- readers -------------------------------------------------------------------------------

    def prewarm_hits(self) -> dict[str, tuple[int, int]]:
        """Model -> (hits, misses): activations that found its weights in device memory, and
        those that had to load them from host memory or disk."""
        out: dict[str, tuple[int, int]] = {}
        for (model, tier), n in self.activations.items():
            hits, misses = out.get(model, (0, 0))
            out[model] = (hits + n, misses) if tier in WARM_TIERS else (hits, misses + n)
        return out

    def observe(self) -> dict[str, Any] | None:
        """The ``SCHEDULER_OBSERVE`` handler: the latest picture and prewarm hits per model, or
        None on a scheduler without the WarmServe extension."""
        if self.view is None:
            return None
        return {"view": self.view.to_dict(), "prewarm": self.prewarm_hits()}
