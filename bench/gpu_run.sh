#!/usr/bin/env bash
# Run a command on the lent GPU machine, which has Python 3.12 and torch but no vLLM, no Dask and
# no package index. What it lacks travels in parts (each call of the device tool carries at most
# 64 MiB; see ../shared/gpu/README.md), built here with
#   bash ../shared/gpu/make_site.sh .gpu/site 54     # vLLM 0.26.0 and its closure, 2 parts
#   pip download --no-deps ... -d .gpu/whl            # dask, distributed, ... (bench/README.md)
# and staged there by consecutive calls (the machine stays up about 30 s between calls):
#   bash bench/gpu_run.sh stage .gpu/site/p1          # carry .gpu/site/p1
#   bash bench/gpu_run.sh stage .gpu/site/p2          # carry .gpu/site/p2
#   bash bench/gpu_run.sh run python3 -m bench.gpu_engine --out '$OUT/gpu_engine.json'
#                                                     # carry .gpu/whl
# `run` unpacks the staged parts once into /tmp/site, installs the wheels carried with it, sets
# the environment and runs the command (quoted $OUT expands there). If the machine was taken back
# between calls, `run` says which part is missing: stage again from the first.
#
# A command longer than one call (10 minutes) runs detached: processes started with setsid
# outlive the call, and the machine stays while calls follow each other (30 s between them):
#   bash bench/gpu_run.sh detach e2e python3 -m bench.gpu_e2e --policy warmserve --out-dir /tmp/e2e
#                                                     # carry .gpu/whl; returns at once
#   bash bench/gpu_run.sh wait e2e 580 /tmp/e2e       # until it exits or 580 s pass; copies
#                                                     # /tmp/e2e and its log to $OUT; again...
# `detach` runs the command from a copy of the tree (a later call replaces the working tree).
set -euo pipefail
stage=/tmp/g
site=/tmp/site
case "${1:-}" in
  stage)
    mkdir -p "$stage"
    cp "$2"/* "$stage"/
    ls -la "$stage"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    ;;
  run|detach)
    mode=$1
    shift
    if [ ! -f "$site/.unpacked" ]; then
      for part in site.part00 site.part01; do
        [ -f "$stage/$part" ] || { echo "missing $stage/$part: stage the parts again" >&2; exit 3; }
      done
      mkdir -p "$site"
      cat "$stage"/site.part* | xz -d -T8 | tar -x -C "$site"
      python3 -m pip install -q --no-index --no-deps --target "$site" .gpu/whl/*.whl
      # numba comes with the machine, built for its NumPy; a carried one would shadow it.
      rm -rf "$site"/numba "$site"/numba-*.dist-info
      touch "$site/.unpacked"
    fi
    # The trimmed site leaves FlashInfer out (../shared/gpu/README.md); its sampler is optional.
    export PYTHONPATH="$PWD:$site" HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
      VLLM_USE_FLASHINFER_SAMPLER=0
    export OUT="${OUT:-/tmp/out}"
    mkdir -p "$OUT"
    if [ "$mode" = run ]; then
      eval "$@"
      exit
    fi
    name=$1
    shift
    rm -rf "/tmp/tree-$name" && mkdir "/tmp/tree-$name"
    cp -r bench warmserve clusters traces pyproject.toml "/tmp/tree-$name"/
    cd "/tmp/tree-$name"
    export PYTHONPATH="$PWD:$site"
    setsid nohup bash -c "$*" >"/tmp/$name.out" 2>&1 </dev/null &
    echo $! >"/tmp/$name.pid"
    echo "detached $name as pid $(cat "/tmp/$name.pid"); log /tmp/$name.out"
    ;;
  wait)
    name=$2 seconds=$3 dir=${4:-}
    pid=$(cat "/tmp/$name.pid")
    end=$((SECONDS + seconds))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 5; done
    if kill -0 "$pid" 2>/dev/null; then echo "$name: still running"; else echo "$name: exited"; fi
    tail -n 20 "/tmp/$name.out"
    out="${OUT:-/tmp/out}"
    mkdir -p "$out"
    cp "/tmp/$name.out" "$out/"
    [ -z "$dir" ] || cp -r "$dir" "$out/"
    ;;
  *)
    echo "usage: bash bench/gpu_run.sh stage DIR | run COMMAND... | detach NAME COMMAND... | wait NAME SECONDS [DIR]" >&2
    exit 2
    ;;
esac
