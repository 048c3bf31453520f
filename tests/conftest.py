"""Shared fixtures: model families generated once per test session.

``tiny_registry`` (3 replicas, a few MB) is what most tests use; ``small_registry`` (2 replicas,
about 200 MB each) is for tests where loading costs must be real. Both live in one session folder
whose ``registry.yaml`` lists them together.
"""

from __future__ import annotations

import os

import pytest

from warmserve.models.make import make_family
from warmserve.registry import Registry


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's model folder (``registry.yaml`` inside lists every family made)."""
    return os.fspath(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_registry(models_dir: str) -> Registry:
    """The ``tiny`` family: tiny-0, tiny-1, tiny-2."""
    return make_family("tiny", "tiny", replicas=3, out=models_dir)


@pytest.fixture(scope="session")
def small_registry(models_dir: str) -> Registry:
    """The ``small`` family: small-0, small-1."""
    return make_family("small", "small", replicas=2, out=models_dir)
