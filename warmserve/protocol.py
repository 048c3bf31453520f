"""What crosses process boundaries on the request path: front door -> worker -> engine.

Plain dataclasses (msgpack/pickle friendly) shared by the front door, the scheduler plugin and
the worker plugin, so each side can be read without the others. Handler names are constants so a
rename is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Worker handlers registered by warmserve.worker_plugin (called via rpc / Client.run).
WORKER_PREWARM = "warmserve_prewarm"
WORKER_EVICT = "warmserve_evict"
WORKER_ACTIVATE = "warmserve_activate"
WORKER_DEACTIVATE = "warmserve_deactivate"
WORKER_STATUS = "warmserve_status"

# Scheduler handlers registered by warmserve.scheduler_plugin.
SCHEDULER_ROUTE = "warmserve_route"
SCHEDULER_DONE = "warmserve_done"
SCHEDULER_SYNC = "warmserve_sync"  # a front door's batched lease report
SCHEDULER_STATUS = "warmserve_status"


@dataclass(slots=True)
class GenerateRequest:
    """One completion request, already validated by the front door.

    Either ``prompt`` (text) or ``prompt_token_ids`` is set. ``request_id`` is unique per request
    and names it in logs, metrics and cancellation.
    """

    request_id: str
    model: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class TokenChunk:
    """A piece of streamed output: new text since the last chunk, and why it ended, if it did."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None while streaming
    prompt_tokens: int = 0  # set on the first chunk
