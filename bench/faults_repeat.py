"""The fault tests, run again and again: a test that can fail on timing shows here, not in CI.

Each run is a fresh ``pytest`` process over the fault suites (a worker killed mid-stream or
while it prewarms, a front door killed mid-stream, a scheduler restarted idle and mid-stream,
a device out of memory at activation, a disk-full weight store, starts that keep failing, a
lost worker's accounting), so nothing carries over between runs but the generated models'
cache. The result lists every run's outcome, its
pytest summary line and wall time, and whether all passed.

Run: ``python -m bench.faults_repeat [--runs 10]`` -> bench/results/faults_repeat.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SUITES = (
    "tests/test_faults.py",
    "tests/test_faults_prewarm.py",
    "tests/test_frontdoor_killed.py",
    "tests/test_restart_scheduler.py",
    "tests/test_restart_mid_stream.py",
    "tests/test_faults_device_memory.py",
    "tests/test_faults_disk_full.py",
    "tests/test_start_failures.py",
    "tests/test_faults_accounting.py",
)


def run_once() -> dict:
    """One pytest process over the suites: its exit code, summary line and seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "returncode": done.returncode,
        "summary": lines[-1] if lines else done.stderr[-300:],
        "s": round(time.perf_counter() - start, 1),
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
        # What each failure asserted: a flaky run is of no use without it.
        "errors": [line for line in lines if line.startswith("E ")][:40],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default="bench/results/faults_repeat.json")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(run_once())
        print(f"[faults_repeat] run {i + 1}/{args.runs}: {runs[-1]['summary']}", flush=True)
        for line in runs[-1]["failures"] + runs[-1]["errors"]:
            print(f"    {line}", flush=True)
    result = {
        "command": f"python -m bench.faults_repeat --runs {args.runs}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "suites": list(SUITES),
        "runs": runs,
        "passed": sum(r["returncode"] == 0 for r in runs),
        "all_passed": all(r["returncode"] == 0 for r in runs),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[faults_repeat] {result['passed']} of {args.runs} runs passed")
    sys.exit(0 if result["all_passed"] else 1)


if __name__ == "__main__":
    main()
