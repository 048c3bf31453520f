"""Background prewarm jobs: acknowledged at once, run on the worker's loop, cancellable.

A prewarm handler returns as soon as its job is accepted; the job's outcome is reported three
ways so that the scheduler plugin can pick whichever suits it: the job's entry in
``warmserve_status``, an event on the worker's ``"warmserve"`` topic, and, for callers that
asked to wait, the handler's reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from warmserve.worker_plugin.errors import Cancelled, WarmServeWorkerError

logger = logging.getLogger("warmserve.worker.jobs")

KEEP_FINISHED = 64  # finished jobs kept for status


@dataclass(eq=False)
class Job:
    """One prewarm: ``model`` up to ``tier`` on ``devices`` (empty for the host tier)."""

    id: str
    model: str
    tier: str
    devices: list[str]
    state: str = "running"  # running | done | failed | cancelled
    error: str | None = None
    kind: str | None = None  # the error's kind (see errors.py) when failed
    submitted: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    task: asyncio.Task | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "tier": self.tier,
            "devices": list(self.devices),
            "state": self.state,
            "error": self.error,
            "kind": self.kind,
            "submitted": self.submitted,
            "finished": self.finished,
        }


class Jobs:
    """The prewarm jobs of one worker; ``report`` is called with each finished job."""

    def __init__(self, report: Callable[[Job], None]) -> None:
        self._report = report
        self._ids = itertools.count(1)
        self.running: dict[str, Job] = {}
        self.finished: list[Job] = []

    def start(
        self, model: str, tier: str, devices: list[str], work: Callable[[Job], Awaitable[None]]
    ) -> Job:
        job = Job(f"prewarm-{next(self._ids)}", model, tier, devices)
        job.task = asyncio.create_task(self._run(job, work), name=job.id)
        self.running[job.id] = job
        return job

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[None]]) -> None:
        try:
            await work(job)
            job.state = "done"
        except (Cancelled, asyncio.CancelledError):
            job.state = "cancelled"
        except WarmServeWorkerError as e:
            job.state, job.error, job.kind = "failed", str(e), e.kind
        except Exception as e:
            logger.exception("%s failed", job.id)
            job.state, job.error, job.kind = "failed", f"{type(e).__name__}: {e}", "error"
        job.finished = time.time()
        self.running.pop(job.id, None)
        self.finished = [*self.finished[-KEEP_FINISHED + 1 :], job]
        self._report(job)

    async def cancel(self, model: str) -> list[Job]:
        """Cancel the running jobs of ``model`` and wait until each has undone its work."""
        jobs = [j for j in self.running.values() if j.model == model]
        for job in jobs:
            job.cancel.set()
        await asyncio.gather(*(j.task for j in jobs if j.task), return_exceptions=True)
        return jobs

    async def close(self) -> None:
        # Only the flag: a task cancelled while its copy thread runs would free memory that
        # the thread still writes to.
        for job in self.running.values():
            job.cancel.set()
        await asyncio.gather(
            *(j.task for j in self.running.values() if j.task), return_exceptions=True
        )

    def to_list(self) -> list[dict]:
        return [j.to_dict() for j in [*self.finished, *self.running.values()]]
