#!/usr/bin/env bash
# Lint, then the test suite (real vLLM engines on the CPU, real LocalClusters, real HTTP).
set -euo pipefail
ruff check warmserve tests bench
ruff format --check warmserve tests bench
python -m pytest -q --durations=15 tests "$@"
