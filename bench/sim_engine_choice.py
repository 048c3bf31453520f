"""simpy or a plain event heap for the simulator? Both replay the same workload through the same
queueing model (per model: 2 instances x 32 slots, fixed prefill + decode per token), and we
count events per second. Only as much of each as the measurement needs; the simulator keeps the
heap (warmserve/sim/README.md says why).

    python bench/sim_engine_choice.py [--requests 300000]
"""

from __future__ import annotations

import heapq
import json
import os
import sys
import time
from collections import deque

import click
import numpy as np
import simpy

SLOTS = 64  # 2 instances x 32 concurrent requests, per model
PREFILL, DECODE = 0.035, 0.015


def workload(n: int, models: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / 15.0, n))
    model = rng.integers(0, models, n)
    out = rng.integers(20, 400, n)
    return arrival, model, out


def with_heap(arrival, model, out, models: int) -> tuple[np.ndarray, int]:
    """Arrivals read from the sorted column, departures on a binary heap, FIFO queues."""
    first = np.empty(len(arrival))
    free = [SLOTS] * models
    queues = [deque() for _ in range(models)]
    heap: list[tuple[float, int, int]] = []
    events = 0
    arr, mdl, outs = arrival.tolist(), model.tolist(), out.tolist()

    def admit(r: int, t: float) -> None:
        f = t + PREFILL
        first[r] = f
        heapq.heappush(heap, (f + (outs[r] - 1) * DECODE, r, mdl[r]))

    i, n = 0, len(arr)
    while i < n or heap:
        if heap and (i == n or heap[0][0] <= arr[i]):
            t, _, m = heapq.heappop(heap)
            if queues[m]:
                admit(queues[m].popleft(), t)
            else:
                free[m] += 1
        else:
            t, m = arr[i], mdl[i]
            if free[m]:
                free[m] -= 1
                admit(i, t)
            else:
                queues[m].append(i)
            i += 1
        events += 1
    return first, events


def with_simpy(arrival, model, out, models: int) -> tuple[np.ndarray, int]:
    """One process per request holding a slot of its model's Resource."""
    env = simpy.Environment()
    slots = [simpy.Resource(env, capacity=SLOTS) for _ in range(models)]
    first = np.empty(len(arrival))
    arr, mdl, outs = arrival.tolist(), model.tolist(), out.tolist()

    def request(r: int):
        with slots[mdl[r]].request() as req:
            yield req
            first[r] = env.now + PREFILL
            yield env.timeout(PREFILL + (outs[r] - 1) * DECODE)

    def source():
        for r, t in enumerate(arr):
            yield env.timeout(t - env.now)
            env.process(request(r))

    env.process(source())
    env.run()
    return first, 2 * len(arr)  # arrival and departure: the events the heap version counts


@click.command()
@click.option("--requests", default=300_000, show_default=True)
@click.option("--models", default=16, show_default=True)
@click.option("--out", default="bench/results/sim_engine_choice.json", show_default=True)
def main(requests: int, models: int, out: str) -> None:
    arrival, model, outs = workload(requests, models)
    results = {}
    firsts = {}
    for name, fn in (("heap", with_heap), ("simpy", with_simpy)):
        t0 = time.perf_counter()
        first, events = fn(arrival, model, outs, models)
        dt = time.perf_counter() - t0
        firsts[name] = first
        results[name] = {
            "seconds": round(dt, 3),
            "events": events,
            "events_per_s": round(events / dt),
        }
        click.echo(f"{name}: {events} events in {dt:.2f} s = {events / dt:,.0f} events/s")
    same = bool(np.allclose(firsts["heap"], firsts["simpy"]))
    click.echo(f"same first-token times: {same}")
    doc = {
        "command": "python " + " ".join(sys.argv),
        "requests": requests,
        "models": models,
        "same_first_token_times": same,
        "results": results,
        "speedup_heap_over_simpy": round(
            results["heap"]["events_per_s"] / results["simpy"]["events_per_s"], 2
        ),
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
