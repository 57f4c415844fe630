#!/usr/bin/env bash
# Fetch, on a machine with the package registries, the wheels a lent GPU machine lacks (its image has
# torch, timm, tensorboard, scikit-learn, pytest, ...; nothing can be fetched there) into .whl/ for
# bench/device/run.sh. Versions follow this checkout's venv where it has one. Python 3.12 x86-64 (the
# device's). About 7.2 MB; the device tool carries at most 64 MiB with the working tree.
#     bash bench/device/wheels.sh        then carry ".whl" with the run
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pin() { local v; v=$(version "$1"); if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi; }
rm -rf .whl && mkdir -p .whl
PLATFORMS=()
for n in 2_28 2_27 2_17 2014; do
  case $n in 2014) PLATFORMS+=(--platform manylinux2014_x86_64) ;; *) PLATFORMS+=(--platform "manylinux_${n}_x86_64") ;; esac
done
# pure-Python wheels and the one binary (pydantic-core) for CPython 3.12
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl $(for p in webdataset braceexpand submitit mlxtend hjson pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions; do pin "$p"; done)
# what DeepSpeed (einops, msgpack, psutil, packaging) and submitit (cloudpickle) import, which the images seen so
# far had: run.sh installs these only where the image lacks one
mkdir -p .whl/fallback
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl/fallback $(for p in einops msgpack psutil cloudpickle packaging; do pin "$p"; done)
# DeepSpeed ships as a source archive: build its (pure-Python) wheel here
"$PY" -m pip wheel -q --no-deps -w .whl "$(pin deepspeed)"
ls -la .whl && du -sh .whl
