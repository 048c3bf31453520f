"""WarmServe's observability on the scheduler: a dashboard page, Prometheus metrics and the
``SCHEDULER_OBSERVE`` handler (:mod:`warmserve.protocol`) behind ``warmserve status``.

Two hooks, because the dashboard is built in two steps. ``Scheduler.__init__`` imports its
preloads and only then builds the dashboard from ``distributed.dashboard.scheduler.applications``,
so :func:`register_page` must run when ``warmserve.scheduler_plugin`` is imported. The preload's
``dask_setup`` runs later, before the scheduler starts its plugins, and calls :func:`install`,
which adds the observer plugin, points the Prometheus collector at this scheduler and puts the
page in the dashboard's navigation.
"""

from __future__ import annotations

from distributed import Scheduler

from warmserve.dashboard.observer import Observer

__all__ = ["Observer", "install", "register_page"]

PAGE = "warmserve"


def register_page() -> None:
    """Offer ``/warmserve`` to every dashboard this process builds from now on."""
    try:
        from distributed.dashboard import scheduler as dashboard
    except ImportError:  # no Bokeh: Dask serves no dashboard either
        return
    from warmserve.dashboard.page import ROUTE, warmserve_doc

    dashboard.applications.setdefault(ROUTE, warmserve_doc)


def install(scheduler: Scheduler) -> Observer:
    """Observe the WarmServe extension of ``scheduler`` for the page, /metrics and the CLI.

    Called from a preload, before the scheduler starts its plugins: adding the observer is
    enough for the scheduler to start it."""
    from warmserve.scheduler_plugin import metrics

    observer = Observer()
    scheduler.add_plugin(observer, name=observer.name, idempotent=True)
    metrics.register(scheduler)
    _link(scheduler)
    return observer


def _link(scheduler: Scheduler) -> None:
    """Add the page to the navigation bar of the dashboard the scheduler already serves.

    The pages share the list in ``template_variables(scheduler)`` (memoized per scheduler), so
    appending to it reaches every page rendered from now on."""
    from bokeh.server.server import BokehTornado

    if not any(isinstance(a, BokehTornado) for a in scheduler.http_application.applications):
        return  # no dashboard on this scheduler
    from distributed.dashboard.scheduler import template_variables

    pages = template_variables(scheduler)["pages"]
    if PAGE not in pages:
        pages.append(PAGE)
