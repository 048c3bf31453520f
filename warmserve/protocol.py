"""The wire contract: every handler name, event topic and message type between WarmServe's
processes (front door, scheduler plugin, worker plugin, ``warmserve status``).

Plain dataclasses (msgpack/pickle friendly) shared by the front door, the scheduler plugin and
the worker plugin, so each side can be read without the others. Handler names are constants so a
rename is one edit. Nothing here imports Dask or vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

# Worker handlers registered by warmserve.worker_plugin (called via rpc / Client.run).
WORKER_PREWARM = "warmserve_prewarm"
WORKER_EVICT = "warmserve_evict"
WORKER_ACTIVATE = "warmserve_activate"
WORKER_DEACTIVATE = "warmserve_deactivate"
WORKER_STATUS = "warmserve_status"
# A front door's channel to a worker: one comm for every request it streams there, each
# engine step's chunks of all of them in one message (warmserve.worker_plugin.channel).
WORKER_CHANNEL = "warmserve_channel"
# The worker plugin's event topic (``log_event``: prewarm jobs, activations, deactivations,
# engine deaths), also the key of its entry in the heartbeat metrics (the WORKER_STATUS dict).
WORKER_TOPIC = "warmserve"

# Scheduler handlers registered by warmserve.scheduler_plugin.
SCHEDULER_ROUTE = "warmserve_route"
SCHEDULER_DONE = "warmserve_done"
SCHEDULER_SYNC = "warmserve_sync"  # a front door's batched lease report
SCHEDULER_STATUS = "warmserve_status"
SCHEDULER_RUN_ONCE = "warmserve_run_once"  # one planning pass now (WarmServeProxy.run_once)
# The dashboard observer's picture, behind ``warmserve status`` (warmserve.dashboard.observer).
SCHEDULER_OBSERVE = "warmserve_observe"
# Event topic the scheduler publishes (``log_event``) when an instance went idle, stopped or
# started: front doors subscribed to it let their waiting requests ask again at once.
SCHEDULER_CHANGED = "warmserve-changed"


@dataclass(slots=True)
class GenerateRequest:
    """One completion request, already validated by the front door: one choice of an OpenAI
    request (the front door fans ``n`` and a list of prompts out into one each).

    Either ``prompt`` (text) or ``prompt_token_ids`` is set. ``request_id`` is unique per request
    and names it in logs, metrics and cancellation. The sampling fields mean what vLLM's
    ``SamplingParams`` fields of the same name mean.
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
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    # (token id, bias) pairs: a map with integer keys would not survive msgpack's strict keys.
    logit_bias: list[tuple[int, float]] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int | None = None  # alternatives per output token (0: the chosen token's only)
    # Report the prompt (text, and its logprobs when ``logprobs`` is set) in the first chunk.
    echo: bool = False
    return_token_ids: bool = False  # report the prompt's token ids in the first chunk (echo too)
    # False for chat prompts: their template already wrote the special tokens it wants (a BOS
    # added on top would change the prompt the model sees, as vLLM's server does not).
    add_special_tokens: bool = True
    # The instance the scheduler chose for it (the front door sets it from the route); the
    # worker serves it there or nowhere. None: the least loaded instance of ``model`` on the
    # worker (callers without a scheduler: benchmarks, tests).
    instance: str | None = None


# One position's logprobs as vLLM ranks them: (token id, logprob, token text) for the chosen
# token first, then the most likely ones. The prompt's first token has no logprob (None) and
# nothing after it.
Position = list[tuple[int, float | None, str]]


@dataclass(slots=True)
class TokenChunk:
    """A piece of streamed output: new text since the last chunk, and why it ended, if it did."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None while streaming
    prompt_tokens: int = 0  # set on the first chunk
    stop_reason: str | int | None = None  # the stop string (or token id) that ended it
    logprobs: list[Position] | None = None  # one per token of ``token_ids``, when asked
    prompt_text: str | None = None  # first chunk of an ``echo`` request
    prompt_token_ids: list[int] | None = None  # first chunk, for ``return_token_ids`` or ``echo``
    prompt_logprobs: list[Position] | None = None  # first chunk of ``echo`` with ``logprobs``


_CHUNK_FIELDS = tuple(f.name for f in fields(TokenChunk))


def chunk_to_wire(chunk: TokenChunk) -> dict:
    """``chunk`` as a message body, its unset fields left out (``TokenChunk(**body)`` restores
    it). Cheaper than ``dataclasses.asdict``, which deep-copies, and smaller on the wire: the
    worker writes one per chunk of every stream, 32 or more per engine step on a GPU."""
    body = {"text": chunk.text, "token_ids": chunk.token_ids}
    for name in _CHUNK_FIELDS[2:]:
        value = getattr(chunk, name)
        if value:
            body[name] = value
    return body


def fold(chunks: Sequence[TokenChunk]) -> TokenChunk:
    """Consecutive chunks of one stream as one: their text, tokens and logprobs joined, the
    first's facts about the prompt, the last's finish. A stream whose reader fell behind gets
    what piled up as one chunk (``Engine.generate``), and a whole answer is one chunk."""
    if len(chunks) == 1:
        return chunks[0]
    first, last = chunks[0], chunks[-1]
    logprobs = None
    if any(c.logprobs is not None for c in chunks):
        logprobs = [p for c in chunks for p in c.logprobs or ()]
    return TokenChunk(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason,
        prompt_tokens=first.prompt_tokens,
        stop_reason=last.stop_reason,
        logprobs=logprobs,
        prompt_text=first.prompt_text,
        prompt_token_ids=first.prompt_token_ids,
        prompt_logprobs=first.prompt_logprobs,
    )
