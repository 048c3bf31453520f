"""Client-side access to the scheduler plugin, like ``client.amm`` for the memory manager."""

from __future__ import annotations

from typing import Any

from distributed import Client

from warmserve import protocol


class WarmServeProxy:
    """``WarmServeProxy(client).status()`` or ``.run_once()``, sync or async as the client is."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _call(self, op: str, **kwargs: Any) -> Any:
        return self._client.sync(getattr(self._client.scheduler, op), **kwargs)

    def status(self) -> Any:
        """Devices (mode, resident models, engines), instances and their load, queues."""
        return self._call(protocol.SCHEDULER_STATUS)

    def run_once(self) -> Any:
        """Run one planning pass now; returns the actions it enacted (as text)."""
        return self._call(protocol.SCHEDULER_RUN_ONCE)
