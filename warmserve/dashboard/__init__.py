"""WarmServe's observability on the scheduler: a dashboard page, Prometheus metrics and the
``SCHEDULER_OBSERVE`` handler (:mod:`warmserve.protocol`) behind ``warmserve status``.

Nothing happens on import. The preload's ``dask_setup`` calls :func:`install` before the
scheduler starts its plugins, which adds the observer plugin, points the Prometheus collector
(:mod:`warmserve.dashboard.metrics`) at this scheduler and serves the page beside the dashboard
that ``Scheduler.__init__`` built already: a Bokeh application of its own in the scheduler's
HTTP application, as ``distributed.dashboard.scheduler.connect`` adds Dask's pages, linked from
the navigation bar.
"""

from __future__ import annotations

from distributed import Scheduler

from warmserve.dashboard.observer import Observer

__all__ = ["Observer", "install"]

PAGE = "warmserve"


def install(scheduler: Scheduler) -> Observer:
    """Observe the WarmServe extension of ``scheduler`` for the page, /metrics and the CLI.

    Called from a preload, before the scheduler starts its plugins: adding the observer is
    enough for the scheduler to start it."""
    from warmserve.dashboard import metrics

    observer = Observer()
    scheduler.add_plugin(observer, name=observer.name, idempotent=True)
    metrics.register(scheduler)
    _serve_page(scheduler)
    return observer


def _serve_page(scheduler: Scheduler) -> None:
    """Serve ``/warmserve`` beside the dashboard the scheduler already serves, if it serves one,
    and add the page to its navigation bar.

    The page is a Bokeh application of its own, built and started as Dask's dashboard is
    (``distributed.dashboard.scheduler.connect``) with the same URL prefix and template
    variables, and appended to the scheduler's HTTP application, which asks its applications in
    turn: Dask's keeps its routes, ours answers ``/warmserve`` and its websocket, and the
    scheduler stops both when it closes. The pages share the list in
    ``template_variables(scheduler)`` (memoized per scheduler), so appending to it reaches every
    page rendered from now on."""
    try:
        from bokeh.server.server import BokehTornado
    except ImportError:  # no Bokeh: Dask serves no dashboard either
        return
    apps = scheduler.http_application
    dask_app = next((a for a in apps.applications if isinstance(a, BokehTornado)), None)
    if dask_app is None:
        return  # no dashboard on this scheduler
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    from warmserve.dashboard.page import ROUTE, warmserve_doc

    variables = template_variables(scheduler)
    if not any(isinstance(a, BokehTornado) and ROUTE in a.app_paths for a in apps.applications):
        # Dask's prefix as the scheduler gave it ("/" by default; Bokeh keeps it without "/").
        prefix = dask_app.prefix or "/"
        ours = BokehApplication(
            {ROUTE: warmserve_doc}, scheduler, prefix=prefix, template_variables=variables
        )
        apps.add_application(ours)
        ours.initialize(IOLoop.current())
        ours.start()
    if PAGE not in variables["pages"]:
        variables["pages"].append(PAGE)
