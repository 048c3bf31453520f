"""``warmserve up`` as a user runs it: a real subprocess, its own cluster, engines and port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.engine

# What a worker logged when the scheduler called it after its plugin was torn down (the planner
# did, at every shutdown), or when a handler raised: a closing worker keeps its handlers and
# answers that it closes, and expected errors go back as answers, not logged tracebacks.
HANDLER_TRACEBACK = re.compile(r"No handler warmserve_|Exception while handling op warmserve_")


def warmserve_up(models_dir: str, *args: str) -> subprocess.Popen:
    """``warmserve up`` in its own session, as in a terminal of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "warmserve", "up", "--port", "0", "--models-dir", models_dir, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def until_up(proc: subprocess.Popen) -> tuple[str, list[str]]:
    """The front door's URL once ``warmserve up`` says it is up, and the lines until then."""
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("WarmServe is up"):
            break
    url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", lines[-1])
    assert url, "".join(lines)
    return url.group(1), lines


def test_demo_answers_both_families_and_exits(tmp_path):
    proc = warmserve_up(os.fspath(tmp_path), "--demo")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    answers = re.findall(r"^\[(\w+)-\d [^\]]*\] TTFT \d+ ms: ", out, re.MULTILINE)
    assert set(answers) == {"tiny", "mini"} and len(answers) == 4, out
    assert "WarmServe stopped." in out
    assert not HANDLER_TRACEBACK.search(out), out


def test_sigterm_stops_everything(tmp_path):
    proc = warmserve_up(os.fspath(tmp_path), "--devices", "1")
    until_up(proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "WarmServe stopped." in out
    assert not HANDLER_TRACEBACK.search(out), out


def test_ctrl_c_stops_everything_without_a_kill(tmp_path):
    """Ctrl-C signals every process of the terminal's group, the workers too: each closes through
    its nanny, without a KeyboardInterrupt traceback, and in time, engine and all (an engine's
    shutdown used to outlast the nanny's deadline, and the nanny SIGKILLed the worker); a stream
    still open is cut after a grace period instead of holding the stop."""
    proc = warmserve_up(os.fspath(tmp_path), "--devices", "1")
    url, lines = until_up(proc)
    body = {"model": "tiny-0", "prompt": "Ctrl-C", "max_tokens": 400, "ignore_eos": True}
    request = {**body, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=600) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
        # A stream is open: the server gives it a moment, then cancels it, without a traceback.
        os.killpg(proc.pid, signal.SIGINT)
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "WarmServe stopped." in out
    assert "Traceback" not in out and "killing" not in out, out
