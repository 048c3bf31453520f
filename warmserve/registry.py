"""The model registry: which models exist, where their weights are, and how big they are.

A registry is a YAML file with one entry per model. ``warmserve models make`` writes one per
generated family; ``warmserve up``, the simulator and the scheduler plugin read them. Pure Python
(no Dask, no vLLM) so the policy code can use :class:`ModelSpec` directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass

import yaml

from warmserve.yamlfile import read_mapping

REGISTRY_FILE = "registry.yaml"  # a models folder's registry, as `warmserve models make` writes it


class RegistryError(ValueError):
    """A registry file is missing, malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One servable model.

    ``family`` groups models that share an architecture and tokenizer: an engine of a family can
    switch among its models in place. ``nbytes`` is the size of the weights (what prewarming moves).
    """

    name: str
    family: str
    nbytes: int
    tp: int = 1
    path: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise RegistryError("a model needs a name")
        if self.nbytes <= 0:
            raise RegistryError(f"model {self.name!r}: bytes must be positive, got {self.nbytes}")
        if self.tp < 1:
            raise RegistryError(f"model {self.name!r}: tp must be >= 1, got {self.tp}")


class Registry(Mapping[str, ModelSpec]):
    """An ordered, read-only mapping of model name to :class:`ModelSpec`."""

    def __init__(self, models: Iterable[ModelSpec] = ()) -> None:
        self._models: dict[str, ModelSpec] = {}
        for m in models:
            if m.name in self._models:
                raise RegistryError(f"model {m.name!r} is listed twice")
            self._models[m.name] = m

    def __getitem__(self, name: str) -> ModelSpec:
        return self._models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"Registry({list(self._models)})"

    def families(self) -> dict[str, list[ModelSpec]]:
        """Models grouped by family, in registry order."""
        out: dict[str, list[ModelSpec]] = {}
        for m in self._models.values():
            out.setdefault(m.family, []).append(m)
        return out

    def merged(self, other: Registry) -> Registry:
        """This registry followed by the models of ``other`` (names must not clash)."""
        return Registry([*self.values(), *other.values()])

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the registry; paths are stored relative to the file's folder when inside it."""
        base = os.path.dirname(os.path.abspath(path))
        entries = []
        for m in self._models.values():
            d = asdict(m)
            d["bytes"] = d.pop("nbytes")
            if d["path"] and os.path.abspath(d["path"]).startswith(base + os.sep):
                d["path"] = os.path.relpath(os.path.abspath(d["path"]), base)
            entries.append(d)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump({"models": entries}, f, sort_keys=False)
        os.replace(tmp, path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Registry:
        """Read a registry file; relative weight paths resolve against the file's folder."""
        doc = read_mapping(path, "registry", RegistryError)
        if not isinstance(doc.get("models"), list):
            raise RegistryError(f"{path}: expected a mapping with a 'models' list")
        base = os.path.dirname(os.path.abspath(path))
        models = []
        for i, e in enumerate(doc["models"]):
            if not isinstance(e, dict):
                raise RegistryError(f"{path}: models[{i}] is not a mapping")
            missing = {"name", "family", "bytes"} - set(e)
            if missing:
                raise RegistryError(f"{path}: models[{i}] lacks {sorted(missing)}")
            p = str(e.get("path") or "")
            if p and not os.path.isabs(p):
                p = os.path.join(base, p)
            try:
                models.append(
                    ModelSpec(
                        name=str(e["name"]),
                        family=str(e["family"]),
                        nbytes=int(e["bytes"]),
                        tp=int(e.get("tp", 1)),
                        path=p,
                    )
                )
            except (TypeError, ValueError) as err:
                raise RegistryError(f"{path}: models[{i}]: {err}") from None
        return cls(models)
