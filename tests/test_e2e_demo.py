"""``warmserve up`` as a user runs it: a real subprocess, its own cluster, engines and port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


def warmserve_up(models_dir: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "warmserve", "up", "--port", "0", "--models-dir", models_dir, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_demo_answers_both_families_and_exits(tmp_path):
    proc = warmserve_up(os.fspath(tmp_path), "--demo")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    answers = re.findall(r"^\[(\w+)-\d [^\]]*\] TTFT \d+ ms: ", out, re.MULTILINE)
    assert set(answers) == {"tiny", "mini"} and len(answers) == 4, out
    assert "WarmServe stopped." in out
    # Shutting down sends no work to a closing worker (it once logged "no handler" tracebacks).
    assert "Traceback" not in out, out


def test_sigterm_stops_everything(tmp_path):
    proc = warmserve_up(os.fspath(tmp_path), "--devices", "1")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("WarmServe is up"):
            break
    assert re.search(r"http://127\.0\.0\.1:\d+/v1", lines[-1]), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "WarmServe stopped." in out
    assert "Traceback" not in out, out
