"""Workload recipes: the ``workload:`` key of a cluster file, how to synthesize its requests.

A setting of the policy matrix (``clusters/matrix/*.yaml``) is a cluster file with a recipe::

    workload:
      trace: servegen          # rate curves: a committed sample's name (TRACES), a list of
                               # names, or .parquet paths relative to the cluster file
      tokens: azure-conv       # (input, output) token pairs: a name of TOKENS or a path
      alpha: 1.0               # Zipf popularity: model i gets (i+1)^-alpha of the rate
      rates: {low: 2, high: 8} # requests/s in total, by name
      seeds: [0, 1, 2]         # workload seeds, one run each
      warmup: 3600             # seconds simulated first, not measured
      duration: 3600           # seconds measured after the warm-up
      cv: null                 # optional: Gamma inter-arrival CV (null: Poisson)
      compress: 1.0            # optional: trace seconds per simulated second

The requests come from :func:`warmserve.traces.synth.synthesize` over the cluster's models, most
popular first. ``load_cluster`` ignores the key, so a recipe never changes what a cluster file
means to ``warmserve simulate --workload``. Every error names the file and the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from warmserve.sim.cluster import ClusterSpec, SimInputError, load_cluster
from warmserve.traces.synth import SAMPLES
from warmserve.yamlfile import read_mapping

# The committed derived samples (traces/README.md) by name: rate curves, and token pairs.
TRACES: dict[str, tuple[str, ...]] = {
    "burstgpt": ("burstgpt.parquet",),
    "servegen": ("servegen_language.parquet",),
    "azure": ("azure_conv.parquet", "azure_code.parquet"),
    "azure-conv": ("azure_conv.parquet",),
    "azure-code": ("azure_code.parquet",),
    "mooncake": ("mooncake_conversation.parquet",),
}
TOKENS: dict[str, str] = {
    "azure-conv": "azure_conv.parquet",
    "azure-code": "azure_code.parquet",
    "burstgpt": "burstgpt.parquet",
    "mooncake": "mooncake_conversation.parquet",
}
REQUIRED = ("trace", "alpha", "rates", "seeds", "warmup", "duration")
OPTIONAL = ("tokens", "cv", "compress")


class RecipeError(SimInputError):
    """A workload recipe cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class Recipe:
    """How to make the requests of one setting (see the module docstring)."""

    path: str  # the cluster file it came from
    trace: tuple[str, ...]  # names as written (for reports)
    sources: tuple[Path, ...]  # the files the names resolve to
    tokens: Path
    alpha: float
    rates: dict[str, float]
    seeds: tuple[int, ...]
    warmup: float
    duration: float
    cv: float | None = None
    compress: float = 1.0

    def rate(self, name: str | float) -> float:
        """A named rate of the recipe (``low``), or a number of requests/s as given."""
        if isinstance(name, str) and name in self.rates:
            return self.rates[name]
        try:
            value = float(name)
        except (TypeError, ValueError):
            raise RecipeError(
                f"{self.path}: workload.rates has no {name!r}; it names {', '.join(self.rates)}"
            ) from None
        if not value > 0 or not math.isfinite(value):
            raise RecipeError(f"{self.path}: a rate must be a positive number, got {name!r}")
        return value

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with warm-up and measured span times ``factor`` (a quick run)."""
        if not factor > 0:
            raise RecipeError(f"{self.path}: scale must be positive, got {factor}")
        return replace(self, warmup=self.warmup * factor, duration=self.duration * factor)

    def workload(self, models: list[str], rate: str | float, seed: int) -> pa.Table:
        """The requests of ``models`` (most popular first) at ``rate``, seed ``seed``."""
        from warmserve.traces.synth import synthesize

        rps = self.rate(rate)
        try:
            return synthesize(
                models,
                self.alpha,
                rps,
                self.warmup + self.duration,
                cv=self.cv,
                seed=seed,
                compress=self.compress,
                sources=self.sources,
                tokens=self.tokens,
            )
        except ValueError as e:
            raise RecipeError(f"{self.path}: workload: {e}") from None

    def describe(self) -> dict[str, Any]:
        """The recipe as plain data, for result files."""
        return {
            "trace": list(self.trace),
            "tokens": self.tokens.name,
            "alpha": self.alpha,
            "rates": dict(self.rates),
            "seeds": list(self.seeds),
            "warmup": self.warmup,
            "duration": self.duration,
            "cv": self.cv,
            "compress": self.compress,
        }


@dataclass(frozen=True, slots=True)
class Setting:
    """A named setting: a cluster file's hardware and models with its workload recipe."""

    name: str
    path: str
    cluster: ClusterSpec
    recipe: Recipe


def _number(doc: dict, key: str, where: str, *, low: float, strict: bool) -> float:
    value = doc[key]
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}.{key}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < low or (strict and v == low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise RecipeError(f"{where}.{key}: must be {bound}, got {value!r}")
    return v


def _file(value: Any, names: dict, base: str, where: str) -> list[Path]:
    """The files ``value`` (a name of ``names`` or a path relative to ``base``) stands for."""
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a name or a .parquet path, got {value!r}")
    if value in names:
        files = names[value]
        return [SAMPLES / f for f in ((files,) if isinstance(files, str) else files)]
    if not value.endswith(".parquet"):
        raise RecipeError(
            f"{where}: unknown name {value!r}; use one of {', '.join(names)} or a .parquet path"
        )
    path = Path(base) / value
    if not path.is_file():
        raise RecipeError(f"{where}: no such file {path}")
    return [path]


def parse_recipe(doc: Any, path: str) -> Recipe:
    """The recipe of the ``workload:`` mapping ``doc`` of the cluster file ``path``."""
    where = f"{path}: workload"
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in REQUIRED + OPTIONAL)
    if unknown:
        raise RecipeError(
            f"{where}.{unknown[0]}: unknown key; a recipe has {', '.join(REQUIRED + OPTIONAL)}"
        )
    for key in REQUIRED:
        if key not in doc:
            raise RecipeError(f"{where}.{key}: missing")
    base = os.path.dirname(os.path.abspath(path))
    trace = doc["trace"] if isinstance(doc["trace"], list) else [doc["trace"]]
    if not trace:
        raise RecipeError(f"{where}.trace: empty list")
    sources = [
        f for i, t in enumerate(trace) for f in _file(t, TRACES, base, f"{where}.trace[{i}]")
    ]
    tokens = _file(doc.get("tokens", "azure-conv"), TOKENS, base, f"{where}.tokens")[0]
    rates = doc["rates"]
    if not isinstance(rates, dict) or not rates:
        raise RecipeError(f"{where}.rates: expected a mapping of names to requests/s")
    rate_values = {str(k): _number(rates, k, f"{where}.rates", low=0, strict=True) for k in rates}
    seeds = doc["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise RecipeError(f"{where}.seeds: expected a list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise RecipeError(f"{where}.seeds: seeds repeat: {seeds}")
    cv = None
    if doc.get("cv") is not None:
        cv = _number(doc, "cv", where, low=0, strict=True)
    compress = _number(doc, "compress", where, low=0, strict=True) if "compress" in doc else 1.0
    return Recipe(
        path=path,
        trace=tuple(str(t) for t in trace),
        sources=tuple(sources),
        tokens=tokens,
        alpha=_number(doc, "alpha", where, low=0, strict=False),
        rates=rate_values,
        seeds=tuple(seeds),
        warmup=_number(doc, "warmup", where, low=0, strict=False),
        duration=_number(doc, "duration", where, low=0, strict=True),
        cv=cv,
        compress=compress,
    )


def load_recipe(path: str | os.PathLike) -> Recipe | None:
    """The workload recipe of the cluster file ``path``, or None if it has none."""
    path = str(path)
    doc = read_mapping(path, "cluster", RecipeError)
    if doc.get("workload") is None:
        return None
    return parse_recipe(doc["workload"], path)


def load_setting(path: str | os.PathLike) -> Setting:
    """A cluster file that must have a recipe (a setting of the matrix), checked whole."""
    path = str(path)
    recipe = load_recipe(path)
    if recipe is None:
        raise RecipeError(f"{path}: workload: missing (a setting needs a workload recipe)")
    cluster = load_cluster(path)
    cluster.check()
    return Setting(Path(path).stem, path, cluster, recipe)
