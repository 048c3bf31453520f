"""Per-model load measured as concurrent requests: time-weighted average and peak per window.

The forecaster learns from these windows; the scheduler plugin feeds arrivals and completions of
live requests and the simulator feeds simulated ones, so both measure load the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


class WindowLoad(NamedTuple):
    """Load of ``model`` in window ``index`` (covering ``[index*w, (index+1)*w)``)."""

    model: str
    index: int
    avg: float
    peak: float


@dataclass(slots=True)
class _Track:
    level: int = 0  # requests in flight
    since: float = 0.0  # time of the last change of level
    area: float = 0.0  # integral of level over the open window so far
    peak: int = 0  # highest level in the open window
    window: int = 0  # index of the open window
    # The peak is only the level carried in at the window's start (no arrival since): a request
    # ending right at that start then lowers it, as it was never in flight inside the window.
    carried: bool = False


class LoadMeter:
    """Integrates each model's concurrency over fixed windows.

    Events must come in non-decreasing time order. :meth:`close_until` emits every window that
    ended at or before ``t``, including empty ones, so a quiet model still teaches the forecaster
    that it was quiet.
    """

    def __init__(self, window: float, start: float = 0.0) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.window = float(window)
        self.start = float(start)
        self._tracks: dict[str, _Track] = {}
        self._pending: list[WindowLoad] = []  # windows closed by arrive/depart, not reported yet

    def _index(self, t: float) -> int:
        return math.floor((t - self.start) / self.window)

    def _track(self, model: str, t: float) -> _Track:
        tr = self._tracks.get(model)
        if tr is None:
            tr = self._tracks[model] = _Track(since=t, window=max(self._index(t), 0))
        return tr

    def _advance(self, tr: _Track, model: str, t: float, out: list[WindowLoad] | None) -> None:
        """Move ``tr`` forward to time ``t``, closing the windows that end on the way."""
        while True:
            end = self.start + (tr.window + 1) * self.window
            if t < end:
                tr.area += tr.level * (t - tr.since)
                tr.since = t
                return
            tr.area += tr.level * (end - tr.since)
            if out is not None:
                out.append(WindowLoad(model, tr.window, tr.area / self.window, float(tr.peak)))
            tr.window += 1
            tr.since = end
            tr.area = 0.0
            tr.peak = tr.level
            tr.carried = True

    def arrive(self, model: str, t: float) -> None:
        """A request of ``model`` started at ``t``."""
        tr = self._track(model, t)
        self._advance(tr, model, t, self._pending)
        tr.level += 1
        tr.peak = max(tr.peak, tr.level)
        tr.carried = False

    def depart(self, model: str, t: float) -> None:
        """A request of ``model`` finished (or failed) at ``t``."""
        tr = self._track(model, t)
        if tr.level <= 0:
            raise ValueError(f"depart of {model!r} at {t} with no request in flight")
        self._advance(tr, model, t, self._pending)
        tr.level -= 1
        if tr.carried and tr.since == self.start + tr.window * self.window:
            tr.peak = tr.level

    def level(self, model: str) -> int:
        """Requests of ``model`` in flight now."""
        tr = self._tracks.get(model)
        return tr.level if tr else 0

    def models(self) -> list[str]:
        return list(self._tracks)

    def close_until(self, t: float) -> list[WindowLoad]:
        """Every window that ended at or before ``t`` and was not reported yet, oldest first."""
        out = self._pending
        self._pending = []
        for model, tr in self._tracks.items():
            self._advance(tr, model, t, out)
        out.sort(key=lambda w: (w.index, w.model))
        return out


class ShortLoad:
    """The autoscaler's load of each model: its mean concurrency over the last closed window
    of ``window`` seconds, never below the requests in flight now.

    A model whose last window was empty and has nothing in flight is left out, so the map
    names only models with load (the planner rescores exactly those). The scheduler plugin
    and the simulator both measure load with this class, so the policy sees the same map live
    and simulated.
    """

    def __init__(self, window: float) -> None:
        self._meter = LoadMeter(window)
        self._recent: dict[str, float] = {}  # last closed window's mean, where nonzero
        # Requests in flight, where any. The meter knows each level too, but this keeps the
        # map's cost to the models in flight, not every model ever seen (the simulator asks
        # at every policy call).
        self._in_flight: dict[str, int] = {}

    def arrive(self, model: str, t: float) -> None:
        self._meter.arrive(model, t)
        self._in_flight[model] = self._in_flight.get(model, 0) + 1

    def depart(self, model: str, t: float) -> None:
        self._meter.depart(model, t)
        left = self._in_flight[model] - 1
        if left:
            self._in_flight[model] = left
        else:
            del self._in_flight[model]

    def load(self, t: float | None = None) -> dict[str, float]:
        """Load per model, after closing the windows that ended by ``t`` (None: close none, for
        a caller between planning passes that must not move the windows on)."""
        if t is not None:
            for w in self._meter.close_until(t):
                if w.avg > 0:
                    self._recent[w.model] = w.avg
                else:
                    self._recent.pop(w.model, None)
        out = dict(self._recent)
        for model, level in self._in_flight.items():
            out[model] = max(out.get(model, 0.0), float(level))
        return out
