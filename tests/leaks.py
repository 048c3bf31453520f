"""What must not leak. From the front door: a traceback, a path into the project's files, or a
pickle in an HTTP answer (Dask sends exceptions pickled; one passed through to a client once).
From a worker after a fault: memory or files it holds for nothing (:func:`leftovers`); from
any process: files in /dev/shm (:func:`shm_left`)."""

from __future__ import annotations

import os
import re

import warmserve

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(warmserve.__file__)))
# A pickle's protocol header (2 to 5) raw, as Python writes bytes in a repr, or JSON-escaped.
_PICKLE = re.compile(rb"\x80[\x02-\x05]|\\x80\\x0[2-5]|\\u0080\\u000[2-5]")


def assert_clean(body: bytes) -> None:
    assert b"Traceback" not in body, body[:500]
    assert PROJECT.encode() not in body, body[:500]
    assert b'.py", line' not in body, body[:500]
    assert not _PICKLE.search(body), body[:500]


def leftovers(dask_worker) -> list[str]:
    """What a worker's WarmServe plugin holds that nothing of its own uses, run in the worker
    (``client.run``): device memory reserved for an engine that is not up, a pool region of no
    resident model (or one never filled while no prewarm runs), a host copy's memfd the host
    tier does not list. Empty when a fault left nothing behind."""
    plugin = dask_worker.plugins["warmserve"]
    out = []
    for device, memory in plugin.store.memory.items():
        up = {s.key for s in plugin.instances.slots(device)}
        out += [f"{device}: engine {k} reserved, not up" for k in memory.engines if k not in up]
        regions = {f"weights:{m}" for m in memory.resident}
        out += [f"{device}: region {t} of no model" for t in memory.pool.tags() if t not in regions]
        if not plugin.jobs.running:
            unfilled = [m for m, r in memory.resident.items() if not r.filled]
            out += [f"{device}: {m} reserved, never filled" for m in unfilled]
    copies = {f"/memfd:warmserve-{m} (deleted)" for m in plugin.store.host.copies}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd, closed by now
            continue
        pool = target.startswith("/memfd:warmserve-pool")
        if target.startswith("/memfd:warmserve-") and not pool and target not in copies:
            out.append(f"{target}: of no host copy")
    return out


def shm_left(before: set[str]) -> list[str]:
    """Files new in /dev/shm since ``before`` (its listing) that no live process maps or holds
    open: what a process left behind. Counting files is not enough on a shared machine, where
    other sessions' files come and go; a file in use is held by its process. Callers poll it:
    a killed process's semaphores go when its resource tracker notices, a moment later."""
    new = set(os.listdir("/dev/shm")) - before
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc") if new else ()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                held.update(
                    line.split("/dev/shm/", 1)[1].split()[0] for line in f if "/dev/shm/" in line
                )
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target.removeprefix("/dev/shm/").split()[0])
        except OSError:  # the process ended, or is not ours to read
            continue
    return sorted(n for n in new - held if os.path.exists(f"/dev/shm/{n}"))
