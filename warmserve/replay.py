"""``warmserve replay``: send a Parquet workload to a front door, open loop, record each request.

Each request is sent at its arrival time (divided by ``--speedup``) whether or not earlier ones have
finished, as real users would: a closed loop would hide queueing, which is what prewarming is
meant to remove. TTFT is measured from the *scheduled* send time, so a client that falls behind
(``--max-concurrency`` reached) charges the delay to the system, not to nobody. Every request that
is scheduled gets a row, whatever happened to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import click
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from warmserve.report.schema import RESULT_SCHEMA
from warmserve.traces.schema import TraceError, read_workload

# A fixed vocabulary of short words: prompts of a requested token count without a tokenizer.
_WORDS = ("the", "of", "and", "to", "in", "is", "for", "on", "with", "as", "by", "at", "from")


@dataclass(slots=True)
class Outcome:
    """What happened to one request (one row of the result file)."""

    model: str
    arrival: float
    sent: float = float("nan")
    ttft: float = float("nan")
    tpot: float = float("nan")
    latency: float = float("nan")
    input_tokens: int = 0
    output_tokens: int = 0
    http_status: int = 0
    status: str = "error"
    error: str = ""
    chunk_times: list[float] = field(default_factory=list)


def make_prompt(n_tokens: int) -> str:
    """A prompt of about ``n_tokens`` tokens (one short word is about one token)."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(max(n_tokens, 1)))


async def _send(
    http: httpx.AsyncClient,
    url: str,
    out: Outcome,
    start: float,
    max_output: int,
    max_input: int,
) -> None:
    body = {
        "model": out.model,
        "prompt": make_prompt(min(out.input_tokens, max_input)),
        "max_tokens": max(1, min(out.output_tokens, max_output)),
        "stream": True,
        # The usage chunk gives the exact token count; a chunk may carry more than one token.
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": True,
    }
    scheduled = start + out.arrival
    out.sent = time.perf_counter() - start
    out.output_tokens = 0  # from here on: tokens generated, not asked for
    tokens = 0
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
            out.http_status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                out.status = "rejected" if resp.status_code in (429, 503) else "error"
                out.error = _error_message(text) or f"HTTP {resp.status_code}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = _error_message(data)
                    return
                usage = chunk.get("usage") or {}
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if not out.chunk_times:
                        out.ttft = now - scheduled
                    out.chunk_times.append(now)
                    tokens += 1
                tokens = int(usage.get("completion_tokens", tokens))
        out.output_tokens = tokens
        out.latency = time.perf_counter() - scheduled
        if len(out.chunk_times) > 1 and tokens > 1:
            out.tpot = (out.chunk_times[-1] - out.chunk_times[0]) / (tokens - 1)
        out.status = "ok" if out.chunk_times else "error"
        if not out.chunk_times:
            out.error = "stream ended without a token"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def replay(
    workload: pa.Table,
    url: str,
    speedup: float = 1.0,
    max_concurrency: int = 256,
    max_output_tokens: int = 64,
    max_input_tokens: int = 128,
    timeout: float = 120.0,
    progress: bool = True,
) -> list[Outcome]:
    """Replay ``workload`` against the front door at ``url``; one :class:`Outcome` per row."""
    arrivals = workload.column("arrival").to_numpy() / speedup
    models = workload.column("model").to_pylist()
    inputs = workload.column("input_tokens").to_numpy()
    outputs = workload.column("output_tokens").to_numpy()
    outcomes = [
        Outcome(model=m, arrival=float(a), input_tokens=int(i), output_tokens=int(o))
        for m, a, i, o in zip(models, arrivals, inputs, outputs, strict=True)
    ]
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=64)
    gate = asyncio.Semaphore(max_concurrency)
    bar = tqdm(total=len(outcomes), unit="req", disable=not progress, desc="replay")

    async def one(out: Outcome, http: httpx.AsyncClient, start: float) -> None:
        delay = start + out.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            async with gate:
                await _send(http, url, out, start, max_output_tokens, max_input_tokens)
        except Exception as e:  # one request's surprise must not lose the others' rows
            out.status, out.error = "error", f"{type(e).__name__}: {e}"
        bar.update(1)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        start = time.perf_counter()
        await asyncio.gather(*(one(o, http, start) for o in outcomes))
    bar.close()
    return outcomes


def bound(
    table: pa.Table, speedup: float, limit: int | None = None, duration: float | None = None
) -> pa.Table:
    """The first rows of ``table`` that are due within ``duration`` replay seconds, at most
    ``limit`` of them: how a long workload is cut to a short run."""
    if duration is not None:
        arrivals = table.column("arrival").to_numpy() / speedup
        table = table.slice(0, int(np.searchsorted(arrivals, duration, side="right")))
    if limit is not None:
        table = table.slice(0, limit)
    return table


def to_table(outcomes: list[Outcome], metadata: dict[str, str]) -> pa.Table:
    """The result rows in the schema shared with the simulator (``warmserve.report.schema``)."""
    cols = {
        "model": [o.model for o in outcomes],
        "arrival": np.array([o.arrival for o in outcomes], dtype=np.float64),
        "sent": np.array([o.sent for o in outcomes], dtype=np.float64),
        "ttft": np.array([o.ttft for o in outcomes], dtype=np.float64),
        "tpot": np.array([o.tpot for o in outcomes], dtype=np.float64),
        "latency": np.array([o.latency for o in outcomes], dtype=np.float64),
        "input_tokens": np.array([o.input_tokens for o in outcomes], dtype=np.int32),
        "output_tokens": np.array([o.output_tokens for o in outcomes], dtype=np.int32),
        "http_status": np.array([o.http_status for o in outcomes], dtype=np.int32),
        "status": [o.status for o in outcomes],
        "error": [o.error for o in outcomes],
    }
    table = pa.table(cols)
    present = [f for f in RESULT_SCHEMA if f.name in table.column_names]
    table = table.select([f.name for f in present]).cast(pa.schema(present))
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})


def write_results(table: pa.Table, path: str) -> None:
    """Write atomically: a crash never leaves a half-written result file."""
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@click.command("replay")
@click.argument("workload", type=click.Path(exists=True, dir_okay=False))
@click.option("--url", required=True, help="Front door base URL, e.g. http://127.0.0.1:8000.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--speedup", default=1.0, show_default=True, help="Divide arrival times by this.")
@click.option("--max-concurrency", default=256, show_default=True, help="Requests in flight.")
@click.option("--limit", default=None, type=int, help="Send only the first N requests.")
@click.option("--duration", default=None, type=float, help="Send only requests due in S seconds.")
@click.option("--max-output-tokens", default=64, show_default=True)
@click.option("--max-input-tokens", default=128, show_default=True)
@click.option("--timeout", default=120.0, show_default=True, help="Per-request timeout (s).")
@click.option("--label", default="", help="Stored as the 'policy' label the report shows.")
def command(
    workload: str,
    url: str,
    out_path: str,
    speedup: float,
    max_concurrency: int,
    limit: int | None,
    duration: float | None,
    max_output_tokens: int,
    max_input_tokens: int,
    timeout: float,
    label: str,
) -> None:
    """Replay WORKLOAD (Parquet) against a running front door and write one row per request."""
    if speedup <= 0:
        raise click.BadParameter("must be positive", param_hint="--speedup")
    if limit is not None and limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    if duration is not None and duration <= 0:
        raise click.BadParameter("must be positive", param_hint="--duration")
    try:
        table = bound(read_workload(workload), speedup, limit, duration)
    except TraceError as e:  # a usage error (exit 2), before anything is sent
        raise click.UsageError(f"not a workload: {e}") from None
    if table.num_rows == 0:
        raise click.ClickException("nothing to replay: the workload (after limits) is empty")
    outcomes = asyncio.run(
        replay(
            table,
            url.rstrip("/"),
            speedup,
            max_concurrency,
            max_output_tokens,
            max_input_tokens,
            timeout,
        )
    )
    meta = {"workload": os.path.abspath(workload), "url": url, "speedup": str(speedup)}
    if label:
        meta["policy"] = label
    write_results(to_table(outcomes, meta), out_path)
    ok = sum(o.status == "ok" for o in outcomes)
    n = len(outcomes)
    click.echo(f"{n} requests: {ok} ok, {n - ok} not ok; results in {out_path}")
