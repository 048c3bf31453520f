"""A deterministic text corpus for training tokenizers, taken from Python's own docstrings.

Docstrings ship with the interpreter, so the corpus needs no download and is the same on every
machine with the same Python; a family's tokenizer is trained once and copied to each replica,
so replicas agree even if a later run has a different Python.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterator

# Modules whose docstrings are plain English prose with some code, like a chat corpus.
_MODULES = (
    "builtins",
    "collections",
    "functools",
    "itertools",
    "os",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "json",
    "argparse",
    "logging",
    "threading",
    "asyncio",
    "subprocess",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "typing",
    "dataclasses",
    "enum",
    "contextlib",
    "heapq",
    "bisect",
    "csv",
    "email.message",
    "http.client",
    "urllib.parse",
    "unittest",
    "difflib",
    "pprint",
    "shutil",
    "tempfile",
    "zipfile",
)


def docstrings() -> Iterator[str]:
    """Yield the docstrings of the listed modules and their public members, in a fixed order."""
    for module_name in _MODULES:
        module = importlib.import_module(module_name)
        if module.__doc__:
            yield module.__doc__
        for name in sorted(vars(module)):
            if name.startswith("_"):
                continue
            with warnings.catch_warnings():  # deprecated members warn on access
                warnings.simplefilter("ignore", DeprecationWarning)
                member = getattr(module, name)
            # Only classes and functions: submodules and data values (e.g. tempfile.tempdir)
            # change with what the process did before, which would change the corpus.
            if not (inspect.isclass(member) or inspect.isroutine(member)):
                continue
            doc = inspect.getdoc(member)
            if doc:
                yield doc
