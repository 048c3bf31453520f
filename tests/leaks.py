"""What no HTTP answer of the front door may carry: a traceback, a path into the project's
files, or a pickle (Dask sends exceptions pickled; one passed through to a client once)."""

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
