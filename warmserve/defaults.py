"""The default of every ``warmserve.*`` setting: ``warmserve.yaml`` beside this module, the one
place they are written.

PyYAML only (no Dask), so the policy package and the engine take their dataclass defaults from
here (:class:`~warmserve.policy.config.PolicyConfig`, ``EngineConfig``) without importing Dask;
:mod:`warmserve.config` registers the same document as dask.config's defaults. The file also
says which keys exist: :func:`check_keys` names any other key a configuration sets, so that a
misspelt setting fails instead of being ignored.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import yaml

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warmserve.yaml")

# Settings whose value is a mapping with keys of the operator's own (model names).
FREE = frozenset({"policy.kv-bytes"})


class ConfigError(ValueError):
    """A ``warmserve.*`` setting that does not exist or cannot be read; the message names it."""


@functools.cache
def _document() -> dict[str, Any]:
    with open(PATH) as f:
        return yaml.safe_load(f)


def document() -> dict[str, Any]:
    """``warmserve.yaml`` as a fresh mapping (``{"warmserve": {...}}``), for dask.config."""
    return _copy(_document())


def get(key: str) -> Any:
    """The default of ``warmserve.<key>`` (a dotted key, e.g. ``"planner.tick"``)."""
    node: Any = _document()["warmserve"]
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"warmserve.{key}: no such setting")
        node = node[part]
    return _copy(node)


def section(name: str) -> dict[str, Any]:
    """The defaults of the section ``warmserve.<name>``: its keys as ``warmserve.yaml`` spells
    them (with dashes)."""
    value = get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"warmserve.{name} is a setting, not a section")
    return value


def unknown_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of ``tree`` (the ``warmserve`` mapping of a configuration, or the part of
    it under ``prefix``) that ``warmserve.yaml`` does not have. Dashes and underscores are the
    same, as dask.config has them (an environment variable gives underscores)."""
    known: Any = get(prefix) if prefix else _document()["warmserve"]
    return _unknown(tree, known, prefix)


def check_keys(tree: Mapping[str, Any], prefix: str = "") -> None:
    """Raise :class:`ConfigError` naming every key of ``tree`` that is not a setting."""
    unknown = unknown_keys(tree, prefix)
    if unknown:
        names = ", ".join(f"warmserve.{k}" for k in unknown)
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {names}")


def _unknown(tree: Mapping[str, Any], known: Mapping[str, Any], prefix: str) -> list[str]:
    names = {str(k).replace("_", "-"): k for k in known}
    out = []
    for key, value in tree.items():
        name = str(key).replace("_", "-")
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in names:
            out.append(dotted)
        elif dotted not in FREE and isinstance(value, Mapping):
            default = known[names[name]]
            if isinstance(default, Mapping):
                out += _unknown(value, default, dotted)
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
