"""Errors a caller of the worker plugin can tell apart, without importing torch or vLLM.

The front door maps them to HTTP statuses (``UnknownModel`` -> 404, ``NoInstance`` -> 503,
``EngineDied`` -> 503 with a retry); the scheduler plugin reads ``DoesNotFit`` as a failed
prewarm that changed nothing, and as a start that may work once memory is free, unlike
``DeviceTooSmall``. Each carries only strings, and none derives from MemoryError or KeyError
(tblib, which Dask uses to send errors back, cannot rebuild such subclasses), so each pickles
across Dask comms; a scheduler, which unpickles nothing, rebuilds them with :func:`arrived`.
"""

from __future__ import annotations

import ast
import re


class WarmServeWorkerError(Exception):
    """Base of the errors raised by the worker plugin's handlers and request path."""

    kind = "error"


class UnknownModel(WarmServeWorkerError):
    """The model is not in the worker's registry."""

    kind = "unknown-model"


class BadRequest(WarmServeWorkerError, ValueError):
    """A malformed handler call or request (unknown tier, device not on this worker, ...)."""

    kind = "bad-request"


class NoInstance(WarmServeWorkerError):
    """No active instance of the model (or no such instance id) on this worker."""

    kind = "no-instance"


class WorkerClosing(NoInstance):
    """The worker is shutting down: its engines are stopping and it takes no new work. A
    ``NoInstance``, so a caller asks the scheduler again, as for an instance that went away."""

    kind = "worker-closing"


class DoesNotFit(WarmServeWorkerError):
    """A tier's memory budget cannot hold the model; nothing resident was dropped."""

    kind = "does-not-fit"


class DeviceTooSmall(WarmServeWorkerError):
    """The device's whole memory cannot hold what was asked (an engine larger than its budget):
    unlike DoesNotFit, no eviction makes room, now or later, so a start there fails every time."""

    kind = "device-too-small"


class DeviceBusy(WarmServeWorkerError):
    """Every candidate device already serves an instance of the model (a device may serve
    several models at once, but one instance of each)."""

    kind = "device-busy"


class EngineDied(WarmServeWorkerError):
    """The engine serving a request died; the request did not complete."""

    kind = "engine-died"


class Cancelled(WarmServeWorkerError):
    """A prewarm was cancelled (by an eviction of the same model) before it completed."""

    kind = "cancelled"


ERRORS: dict[str, type[WarmServeWorkerError]] = {
    cls.kind: cls
    for cls in (
        WarmServeWorkerError,
        UnknownModel,
        BadRequest,
        NoInstance,
        WorkerClosing,
        DoesNotFit,
        DeviceTooSmall,
        DeviceBusy,
        EngineDied,
        Cancelled,
    )
}


def error_from_wire(kind: str, message: str) -> WarmServeWorkerError:
    """Rebuild an error sent as ``{"kind", "message"}`` over a streaming comm."""
    return ERRORS.get(kind, WarmServeWorkerError)(message)


_BY_NAME = {cls.__name__: cls for cls in ERRORS.values()}


def arrived(e: Exception) -> Exception:
    """``e`` as the worker raised it, where a scheduler's rpc to a worker handler raised ``e``.

    A scheduler unpickles nothing its comms bring, so a handler's error (see
    ``answers_errors``) reaches it as ``Exception(repr(error))``, and ``isinstance(e,
    DoesNotFit)`` never held there: every "no room now" counted as a failed start. This rebuilds
    the worker's error from that text; any other exception is returned as it is."""
    if type(e) is not Exception:
        return e
    match = re.fullmatch(r"(\w+)\((.*)\)", str(e), re.DOTALL)
    cls = _BY_NAME.get(match[1]) if match else None
    if cls is None:
        return e
    try:
        message = ast.literal_eval(match[2])
    except (ValueError, SyntaxError):
        return e
    return cls(message) if isinstance(message, str) else e
