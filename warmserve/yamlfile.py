"""Reading the project's YAML files (registries, cluster files) with errors that name the file."""

from __future__ import annotations

import os
from typing import Any

import yaml


def read_mapping(path: str | os.PathLike, what: str, error: type[Exception]) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path``; ``error`` naming the file when it is
    missing (``"no such {what} file"``), not YAML, or not a mapping."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a mapping")
    return doc
