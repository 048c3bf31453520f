"""WarmServe: multi-LLM serving with one-for-many GPU prewarming on Dask and vLLM."""

from warmserve import config as _config  # noqa: F401  (registers the warmserve.* dask config)

__version__ = "0.1.0"
