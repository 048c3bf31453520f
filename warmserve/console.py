"""What ``warmserve up`` and ``warmserve frontdoor`` print: quiet unless ``--verbose``.

By default WarmServe's own loggers speak at INFO, which the live system keeps to one line per
engine start, instance start, activation and eviction (and WARNING for what went wrong); Dask's
at WARNING, since its INFO is per-connection bookkeeping (a client that disconnects mid-stream
logs "Lost connection" with the closed comm's traceback); vLLM's at ERROR, since every engine
start logs some forty lines at INFO and WARNING and every request a deprecation warning; and
torch's C++ warnings, Python's warnings and progress bars stay off. ``--verbose`` shows
WarmServe's DEBUG and Dask's, vLLM's and torch's INFO.

Worker processes are started later and configure their own logging, so the levels go to them
as environment variables set here: ``DASK_LOGGING__<NAME>``, which Dask applies (with a
handler in its log format) when a process imports it, and vLLM's and torch's own variables.
"""

from __future__ import annotations

import logging
import os

import dask.config

QUIET = {"warmserve": "info", "distributed": "warning", "vllm": "error"}
VERBOSE = {"warmserve": "debug", "distributed": "info", "vllm": "info"}


def configure(verbose: bool) -> None:
    """Set the console's levels in this process and for the processes it starts."""
    levels = VERBOSE if verbose else QUIET
    for name, level in levels.items():
        os.environ[f"DASK_LOGGING__{name.upper()}"] = level
        logging.getLogger(name).setLevel(level.upper())
    os.environ["VLLM_LOGGING_LEVEL"] = levels["vllm"].upper()
    os.environ["TORCH_CPP_LOG_LEVEL"] = "INFO" if verbose else "ERROR"
    if not verbose:
        os.environ["TQDM_DISABLE"] = "1"  # progress bars in the worker processes
        # Libraries' deprecation notices (torch's, at every engine start) are for developers.
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    show_ours()


def show_ours() -> None:
    """Give WarmServe's loggers the handler Dask gives its own when it is imported (its log
    format, stderr), at INFO unless a level was set, if logging is not configured yet: in a
    ``dask scheduler`` or ``dask worker`` started by hand, the preloads call this, or their
    lines (starts, activations, evictions) would go nowhere. A process that configured logging
    (a root handler, as an application or pytest has) keeps it as it is."""
    ours = logging.getLogger("warmserve")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
    ours.addHandler(handler)
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
