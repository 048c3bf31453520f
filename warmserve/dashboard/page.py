"""The WarmServe page of the Dask dashboard (``/warmserve``).

A Bokeh document like distributed's own pages (its template, navigation and theme), redrawn every
second from the :class:`~warmserve.dashboard.observer.Observer`: device memory by state, a table
of devices with the models on them and their tier, a table of models, one plot per model of its
load against the forecast, and the last actions done on the devices.
"""

from __future__ import annotations

import math
import time as clock
from typing import Any

from bokeh.document import Document
from bokeh.layouts import column, gridplot, row
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    Div,
    FactorRange,
    NumeralTickFormatter,
    TableColumn,
)
from bokeh.plotting import figure
from dask.utils import format_bytes
from distributed import Scheduler
from distributed.dashboard.components import add_periodic_callback
from distributed.dashboard.components.scheduler import BOKEH_THEME, env
from distributed.utils import log_errors

from warmserve.dashboard.observer import NAME as OBSERVER
from warmserve.dashboard.observer import Observer
from warmserve.dashboard.view import ClusterView

ROUTE = "/warmserve"
REFRESH_MS = 1000
MODE_COLORS = {"idle": "#bbbbbb", "universal": "#f0a830", "dedicated": "#2f9e44"}


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _clock(t: float) -> str:
    return clock.strftime("%H:%M:%S", clock.localtime(t))


def _table(source: ColumnDataSource, columns: list[tuple[str, str]], height: int) -> DataTable:
    return DataTable(
        source=source,
        columns=[TableColumn(field=f, title=t) for f, t in columns],
        height=height,
        index_position=None,
        sizing_mode="stretch_width",
    )


class WarmServePage:
    """The page's Bokeh models and their update; one per open browser tab."""

    def __init__(self, observer: Observer, models: list[str]) -> None:
        self.observer = observer
        self.header = Div(text="", sizing_mode="stretch_width")

        self.memory_source = ColumnDataSource(
            {"device": [], "memory": [], "used": [], "color": [], "mode": []}
        )
        self.memory = figure(
            title="Device memory (bar: used, colored by state; outline: budget)",
            y_range=FactorRange(),
            height=260,
            width=460,
            tools="",
            toolbar_location=None,
        )
        self.memory.hbar(
            y="device",
            left=0,
            right="memory",
            height=0.7,
            source=self.memory_source,
            fill_alpha=0,
            line_color="#555555",
        )
        self.memory.hbar(
            y="device",
            left=0,
            right="used",
            height=0.7,
            source=self.memory_source,
            color="color",
            legend_field="mode",
        )
        self.memory.xaxis.formatter = NumeralTickFormatter(format="0.0 b")
        self.memory.legend.location = "bottom_right"

        self.devices_source = ColumnDataSource(
            {k: [] for k in ("device", "node", "state", "models", "used", "lent")}
        )
        self.devices = _table(
            self.devices_source,
            [
                ("device", "Device"),
                ("node", "Node"),
                ("state", "State"),
                ("models", "Models (tier)"),
                ("used", "Memory used"),
                ("lent", "Lent"),
            ],
            height=260,
        )

        model_fields = [
            ("model", "Model"),
            ("family", "Family"),
            ("load", "Load"),
            ("forecast_avg", "Forecast avg"),
            ("forecast_peak", "Forecast peak"),
            ("instances", "Instances"),
            ("starting", "Starting"),
            ("queued", "Queued"),
            ("host", "In host memory on"),
            ("hits", "Prewarm hits"),
            ("misses", "Misses"),
        ]
        self.models_source = ColumnDataSource({f: [] for f, _ in model_fields})
        self.models = _table(self.models_source, model_fields, height=30 + 28 * len(models))

        self.series: dict[str, ColumnDataSource] = {}
        plots = []
        for name in models:
            source = ColumnDataSource({"time": [], "load": [], "avg": [], "peak": []})
            p = figure(
                title=f"{name}: load and forecast",
                x_axis_type="datetime",
                height=220,
                width=380,
                tools="",
                toolbar_location=None,
            )
            p.line("time", "load", source=source, line_width=2, legend_label="load")
            p.line(
                "time",
                "avg",
                source=source,
                line_dash="dashed",
                color="#f08c00",
                legend_label="forecast avg",
            )
            p.line(
                "time",
                "peak",
                source=source,
                line_dash="dotted",
                color="#e03131",
                legend_label="forecast peak",
            )
            p.legend.location = "top_left"
            p.legend.background_fill_alpha = 0.4
            p.legend.label_text_font_size = "8pt"
            p.legend.padding = p.legend.spacing = 0
            p.y_range.start = 0
            self.series[name] = source
            plots.append(p)

        self.actions_source = ColumnDataSource(
            {k: [] for k in ("time", "action", "model", "where", "detail")}
        )
        self.actions = _table(
            self.actions_source,
            [
                ("time", "Time"),
                ("action", "Action"),
                ("model", "Model"),
                ("where", "Where"),
                ("detail", "Detail"),
            ],
            height=240,
        )

        self.root = column(
            self.header,
            row(self.memory, self.devices, sizing_mode="stretch_width"),
            Div(text="<b>Models</b>"),
            self.models,
            gridplot(plots, ncols=3) if plots else Div(text="No models."),
            Div(text="<b>Last actions on devices</b>"),
            self.actions,
            sizing_mode="stretch_width",
        )

    def update(self) -> None:
        view = self.observer.view
        if view is None:
            self.header.text = "<h3>WarmServe</h3><p>Waiting for the WarmServe extension.</p>"
            return
        self._header(view)
        self._devices(view)
        self._models(view)
        for name, source in self.series.items():
            samples = list(self.observer.series.get(name, ()))
            source.data = {
                "time": [s.time * 1000.0 for s in samples],
                "load": [s.load for s in samples],
                "avg": [_nan(s.forecast_avg) for s in samples],
                "peak": [_nan(s.forecast_peak) for s in samples],
            }
        recent = list(reversed(self.observer.happenings))
        self.actions_source.data = {
            "time": [_clock(h.time) for h in recent],
            "action": [h.action for h in recent],
            "model": [h.model for h in recent],
            "where": [h.where for h in recent],
            "detail": [h.detail for h in recent],
        }

    def _header(self, view: ClusterView) -> None:
        modes = [d.mode for d in view.devices]
        states = ", ".join(f"{modes.count(m)} {m}" for m in MODE_COLORS)
        self.header.text = (
            f"<h3>WarmServe</h3><p>Policy <b>{view.policy}</b>; {len(view.devices)} devices "
            f"({states}); {len(view.models)} models; updated {_clock(view.time)}</p>"
        )

    def _devices(self, view: ClusterView) -> None:
        ids = [d.id for d in view.devices]
        if list(self.memory.y_range.factors) != ids:
            self.memory.y_range.factors = ids
        self.memory_source.data = {
            "device": ids,
            "memory": [d.memory for d in view.devices],
            "used": [d.used or 0 for d in view.devices],
            "color": [MODE_COLORS.get(d.mode, "#888888") for d in view.devices],
            "mode": [d.mode for d in view.devices],
        }
        self.devices_source.data = {
            "device": ids,
            "node": [d.node for d in view.devices],
            "state": [d.mode for d in view.devices],
            "models": [
                ", ".join(f"{m} ({t})" for m, t in d.models.items()) or "-" for d in view.devices
            ],
            "used": [
                "?" if d.used is None else f"{format_bytes(d.used)} / {format_bytes(d.memory)}"
                for d in view.devices
            ],
            "lent": [format_bytes(d.lent) for d in view.devices],
        }

    def _models(self, view: ClusterView) -> None:
        hits = self.observer.prewarm_hits()

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        self.models_source.data = {
            "model": [m.name for m in view.models],
            "family": [m.family for m in view.models],
            "load": [fmt(m.load) for m in view.models],
            "forecast_avg": [fmt(m.forecast_avg) for m in view.models],
            "forecast_peak": [fmt(m.forecast_peak) for m in view.models],
            "instances": [m.instances for m in view.models],
            "starting": [m.starting for m in view.models],
            "queued": [m.queued for m in view.models],
            "host": [", ".join(m.host_nodes) or "-" for m in view.models],
            "hits": [hits.get(m.name, (0, 0))[0] for m in view.models],
            "misses": [hits.get(m.name, (0, 0))[1] for m in view.models],
        }


@log_errors
def warmserve_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """The Bokeh application function, called by the dashboard for each new page view."""
    doc.title = "Dask: WarmServe"
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME
    observer = scheduler.extensions.get(OBSERVER)
    if not isinstance(observer, Observer):
        doc.add_root(Div(text="<h3>WarmServe is not installed on this scheduler.</h3>"))
        return
    extension = observer.extension
    models = sorted(extension.registry) if extension is not None else []
    page = WarmServePage(observer, models)
    page.update()
    doc.add_root(page.root)
    add_periodic_callback(doc, page, REFRESH_MS)
