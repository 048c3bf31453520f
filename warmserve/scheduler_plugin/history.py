"""The planner's forecaster history on disk, so a restarted scheduler forecasts as before.

The forecaster learns only from closed load windows (300 s each by default): a scheduler that
forgot them would plan from nothing for periods (days) until the seasonal part filled again.
So :class:`History` writes the forecaster's state (:meth:`Forecaster.state`) to
``<warmserve.scheduler.history-dir>/forecaster.parquet`` every
``warmserve.scheduler.history-every`` closed windows and when the scheduler closes, and reads
it back when the scheduler starts. One row per model, one list column per state array (the
model's slice, flattened); shapes, forecaster parameters and the window length sit in the schema
metadata, and a file written under other ones is ignored rather than misread. Writes go to a
temporary file that replaces the old one, so a crash mid-write leaves the previous history.

Only the window open at the restart is lost (the meter restarts it empty), and the windows the
scheduler was away count as unobserved, which the forecaster treats as missing, not as zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warmserve.policy.forecast import Forecaster

logger = logging.getLogger("warmserve.scheduler.history")

FILE = "forecaster.parquet"


def _identity(forecaster: Forecaster, window: float) -> dict[str, str]:
    """What a history must have been written under to be valid for ``forecaster``."""
    return {"params": repr(forecaster.params), "window": repr(float(window))}


def _write(models: tuple[str, ...], state: dict[str, np.ndarray], meta: dict, path: str) -> None:
    """Write atomically (a temporary file, then a rename): a crash keeps the last history."""
    n = len(models)
    columns = {"model": pa.array(models, pa.string())}
    shapes = {}
    for name, a in state.items():
        shapes[name] = [*a.shape[:-1]]
        per_model = np.moveaxis(a, -1, 0).reshape(n, -1)  # model first, then the rest flat
        columns[name] = pa.array(list(per_model), pa.list_(pa.from_numpy_dtype(a.dtype)))
    metadata = {**meta, "shapes": json.dumps(shapes)}
    table = pa.table(columns).replace_schema_metadata(metadata)
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load(forecaster: Forecaster, path: str, window: float) -> int:
    """Restore ``forecaster`` from ``path``; return the models restored (0: none or invalid).

    A missing, unreadable or foreign file is logged and ignored: the scheduler must start
    anyway, only with a forecaster that learns from scratch."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return 0
    except (OSError, pa.ArrowException) as e:
        logger.warning("cannot read forecaster history %s (%s); ignored", path, e)
        return 0
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    want = _identity(forecaster, window)
    if any(meta.get(k) != v for k, v in want.items()):
        logger.warning("forecaster history %s was written under other parameters; ignored", path)
        return 0
    try:
        models = tuple(table.column("model").to_pylist())
        state = {}
        for name, shape in json.loads(meta["shapes"]).items():
            flat = table.column(name).combine_chunks().flatten().to_numpy()
            state[name] = np.moveaxis(flat.reshape(len(models), *shape), 0, -1)
        forecaster.restore(models, state)
    except (KeyError, ValueError, pa.ArrowException) as e:
        logger.warning("forecaster history %s does not fit (%s); ignored", path, e)
        return 0
    return len(models)


class History:
    """Keeps one forecaster's history in ``directory``: loaded at start, saved as windows close.

    Saving copies the state on the event loop (so it is consistent with the windows observed)
    and writes it in a thread; one write runs at a time, so the newest state lands last.
    """

    def __init__(self, directory: str, forecaster: Forecaster, window: float, every: int) -> None:
        self.path = os.path.join(directory, FILE)
        self.directory = directory
        self.forecaster = forecaster
        self.window = window
        self.every = max(1, every)
        self._unsaved = 0  # windows closed since the last save
        self._lock = asyncio.Lock()

    def load(self) -> int:
        """Restore the forecaster from the file, if there is one; return the models restored."""
        n = load(self.forecaster, self.path, self.window)
        if n:
            logger.info("forecaster history of %d models loaded from %s", n, self.path)
        return n

    async def closed(self, windows: int) -> None:
        """``windows`` windows closed (and were observed); save once ``every`` have."""
        self._unsaved += windows
        if self._unsaved >= self.every:
            await self.save()

    async def save(self) -> None:
        """Write the state now (errors are logged: the planner must go on without a disk)."""
        self._unsaved = 0
        models, state = self.forecaster.models, self.forecaster.state()
        meta = _identity(self.forecaster, self.window)
        async with self._lock:
            try:
                os.makedirs(self.directory, exist_ok=True)
                await asyncio.to_thread(_write, models, state, meta, self.path)
            except OSError as e:
                logger.warning("cannot write forecaster history to %s: %s", self.path, e)
