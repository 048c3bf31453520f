"""What ``warmserve up`` prints, and how it stops on Ctrl-C.

Two runs of the real command, each in its own session (process group), its stdout and stderr
read together as a terminal shows them:

1. ``demo``: ``warmserve up --demo`` from start to exit.
2. ``serve``: ``warmserve up``, then ``--requests`` mixed requests (every model of the registry,
   completions and chat, streamed and not) from ``--concurrency`` clients, of which
   ``--disconnects`` go away early (half after the first streamed token, half before an
   answer), then, with one long stream open, SIGINT to the whole group, as Ctrl-C in a terminal
   sends it to every process of the foreground group; the stop time runs from the signal to the
   launcher's exit.

Each run counts console lines and tracebacks, and whether the nanny SIGKILLed a worker (it logs
"still alive ... killing" at WARNING, which the quiet console keeps). The lines themselves are
kept in the JSON, so a reader sees what a user sees.

Run: ``python -m bench.console_lines [--requests 100 --disconnects 10]``
-> bench/results/console.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from warmserve import config
from warmserve.models.make import ensure_default_models
from warmserve.registry import Registry

WARMSERVE = os.path.join(os.path.dirname(sys.executable), "warmserve")
UP = re.compile(r"WarmServe is up .*?(http://\S+)/v1")
DEADLINE = 900.0  # seconds any one wait may take on a loaded 2-core machine
KILLED = ("still alive", "killed by signal 9")


@dataclass
class Console:
    """A ``warmserve`` command in its own session, its output lines collected as they come."""

    args: list[str]
    proc: subprocess.Popen = field(init=False)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            [WARMSERVE, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first line matching ``pattern``; AssertionError if the command ends first."""
        deadline = time.monotonic() + DEADLINE
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if match := pattern.search(line):
                    return match
            seen = len(self.lines)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"never saw {pattern.pattern}:\n" + "\n".join(self.lines))

    def interrupt(self) -> float:
        """Ctrl-C: SIGINT to the command's process group; seconds until the command exits."""
        start = time.perf_counter()
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(DEADLINE)
        return time.perf_counter() - start

    def _left_in_group(self) -> list[str]:
        """Processes of the command's group still alive 10 s after it ended (then killed)."""
        deadline = time.monotonic() + 10
        while True:
            ps = subprocess.run(
                ["ps", "-o", "pid=,args=", "-g", str(self.proc.pid)], capture_output=True, text=True
            )
            left = [line.strip() for line in ps.stdout.splitlines() if line.strip()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if left:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return left

    def finish(self) -> dict:
        """Wait for the end; the figures of the run and its lines."""
        self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        left = self._left_in_group()
        return {
            "command": " ".join(["warmserve", *self.args]),
            "exit_code": self.proc.returncode,
            "console_lines": len(self.lines),
            "tracebacks": sum("Traceback" in line for line in self.lines),
            "sigkilled": any(k in line for line in self.lines for k in KILLED),
            "processes_left": left,
            "lines": self.lines,
        }


def request_plan(registry: Registry, n: int, disconnects: int) -> list[dict]:
    """``n`` requests over every model, endpoint and streaming mode; ``disconnects`` of them
    marked to go away early (``"leave"``: ``"first-token"`` or ``"before-answer"``)."""
    names = list(registry)
    every = max(1, n // disconnects) if disconnects else n + 1
    leaving = list(range(every - 1, n, every))[:disconnects]
    plan = []
    for i in range(n):
        chat = i % 2 == 1
        prompt = (
            {"messages": [{"role": "user", "content": f"Request {i}: say something."}]}
            if chat
            else {"prompt": f"Request {i}: the scheduler assigns"}
        )
        item = {
            "endpoint": "chat/completions" if chat else "completions",
            "body": {
                "model": names[i % len(names)],
                "max_tokens": 8 + i % 9,
                "stream": (i // 2) % 2 == 0,
                **prompt,
            },
            "leave": None,
        }
        if i in leaving:
            early = leaving.index(i) % 2 == 0
            item["leave"] = "first-token" if early else "before-answer"
            item["body"].update(stream=True, max_tokens=200)
        plan.append(item)
    return plan


async def send(http: httpx.AsyncClient, item: dict) -> str:
    """One request; its outcome (the status, or how it left)."""
    url = f"/v1/{item['endpoint']}"
    if item["leave"] == "before-answer":
        try:
            await asyncio.wait_for(http.post(url, json=item["body"]), timeout=0.05)
        except TimeoutError:
            return "left before the answer"
        return "answered before it could leave"
    if not item["body"]["stream"]:
        return str((await http.post(url, json=item["body"])).status_code)
    async with http.stream("POST", url, json=item["body"]) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return str(resp.status_code)
        async for line in resp.aiter_lines():
            if item["leave"] == "first-token" and line.startswith("data: "):
                return "left after the first token"
    return "200"


async def mixed(url: str, plan: list[dict], concurrency: int) -> dict[str, int]:
    """Send ``plan`` with ``concurrency`` clients; outcomes counted."""
    todo = list(plan)
    outcomes: dict[str, int] = {}

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            outcome = await send(http, todo.pop(0))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return outcomes


def demo_run(models_dir: str) -> dict:
    console = Console(["up", "--demo", "--port", "0", "--models-dir", models_dir])
    start = time.perf_counter()
    result = console.finish()
    return {"seconds": round(time.perf_counter() - start, 1), **result}


async def interrupt_mid_stream(console: Console, url: str, model: str) -> float:
    """Ctrl-C while a long stream is open (its first token in): the stop time."""
    body = {"model": model, "prompt": "Ctrl-C", "max_tokens": 400, "ignore_eos": True}
    body = {**body, "stream": True}
    async with (
        httpx.AsyncClient(base_url=url, timeout=DEADLINE) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
        return await asyncio.to_thread(console.interrupt)


def serve_run(models_dir: str, registry: Registry, args: argparse.Namespace) -> dict:
    console = Console(["up", "--port", "0", "--models-dir", models_dir])
    try:
        url = console.wait_for(UP).group(1)
        plan = request_plan(registry, args.requests, args.disconnects)
        outcomes = asyncio.run(mixed(url, plan, args.concurrency))
        stop = asyncio.run(interrupt_mid_stream(console, url, next(iter(registry))))
    finally:
        if console.proc.poll() is None:
            os.killpg(console.proc.pid, signal.SIGKILL)
    return {"requests": outcomes, "ctrl_c_stop_seconds": round(stop, 2), **console.finish()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--disconnects", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--models-dir", default=None, help="[default: warmserve.models-dir]")
    parser.add_argument("--out", default="bench/results/console.json")
    args = parser.parse_args()
    models_dir = os.path.abspath(args.models_dir or config.get("models-dir"))
    registry = ensure_default_models(models_dir)
    result = {
        "command": " ".join(["python -m bench.console_lines", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "demo": demo_run(models_dir),
        "serve": serve_run(models_dir, registry, args),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for name in ("demo", "serve"):
        run = {k: v for k, v in result[name].items() if k != "lines"}
        print(name, json.dumps(run))


if __name__ == "__main__":
    main()
