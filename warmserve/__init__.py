"""WarmServe: multi-LLM serving with one-for-many GPU prewarming on Dask and vLLM.

Importing a module of the package has no side effects: the ``warmserve.*`` dask.config defaults
are registered by :mod:`warmserve.config`, which every module that reads them imports, and the
dashboard page is served when the scheduler preload sets up (:func:`warmserve.dashboard.install`).
"""

__version__ = "0.1.0"
