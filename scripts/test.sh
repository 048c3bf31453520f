#!/usr/bin/env bash
# Lint, then the test suite (real vLLM engines on the CPU, real LocalClusters, real HTTP).
set -euo pipefail
ruff check warmserve tests bench
ruff format --check warmserve tests bench
# tests/test_engine.py starts vLLM engines inside the pytest process, so it runs in a process of
# its own: an engine start scans every loaded module (vLLM's CPU kernel overrides) and fails on
# llvmlite's ffi wrappers, which numba brings in once the forecaster has run in-process (the
# scheduler-side tests). Workers never import numba, so served engines are not affected.
python -m pytest -q tests/test_engine.py "$@"
python -m pytest -q --durations=15 --ignore tests/test_engine.py tests "$@"
