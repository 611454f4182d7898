#!/usr/bin/env bash
# CI, interpreter tier: mamba-ssm's Triton kernels through the harness's backends, on the CPU, under Triton's
# interpreter (tests/test_triton_interpreter.py; what it proves: docs/gpu.md).
#
# Its own environment: the pinned packages of pyproject's `interpreter` extra go into .triton-tier/site, a
# folder that only this tier puts on PYTHONPATH, over the project's .venv (scripts/setup.sh), so the default
# suite never sees triton (about 1 GB installed). Its own process: TRITON_INTERPRET=1 must be set before triton
# is imported. mamba-ssm publishes only a source release; its pure-Python wheel (Triton kernels, no compiled
# selective scan) is built here against the .venv's torch, without build isolation, as pyproject's comment says.
set -euo pipefail
cd "$(dirname "$0")/.."
TIER=.triton-tier
PY=.venv/bin/python
[ -x "$PY" ] || { echo "triton tier: run scripts/setup.sh first (no .venv)" >&2; exit 1; }

# The pins, read from pyproject.toml so that they live in one place.
read -r -a PINS < <("$PY" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["interpreter"]))')
[ "${#PINS[@]}" -gt 0 ] || { echo "triton tier: no 'interpreter' extra in pyproject.toml" >&2; exit 1; }
started=$(date +%s)
if [ "$(cat "$TIER/pins" 2>/dev/null)" != "${PINS[*]}" ]; then
  rm -rf "$TIER" && mkdir -p "$TIER/build" "$TIER/wheels"
  mamba_pin=""; others=()
  for pin in "${PINS[@]}"; do
    case "$pin" in mamba-ssm==*) mamba_pin="$pin" ;; *) others+=("$pin") ;; esac
  done
  # mamba-ssm's setup.py imports torch and wheel: build against the .venv's torch, with `wheel` on the side.
  "$PY" -m pip install -q --target "$TIER/build" wheel
  PYTHONPATH="$TIER/build" MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation "$mamba_pin" -w "$TIER/wheels"
  # --no-deps: mamba-ssm's declared needs (transformers, tilelang, ...) serve its model classes, not the kernels.
  "$PY" -m pip install -q --no-deps --target "$TIER/site" "${others[@]}" "$TIER"/wheels/mamba_ssm-*.whl
  echo "${PINS[*]}" > "$TIER/pins"
fi
installed=$(date +%s)
echo "triton tier: ${PINS[*]} in $TIER/site ($(du -sh "$TIER/site" | cut -f1)), ready in $((installed - started)) s"
TRITON_INTERPRET=1 PYTHONPATH="$TIER/site" "$PY" -m pytest -q -s -p no:cacheprovider tests/test_triton_interpreter.py
echo "triton tier: tests ran in $(( $(date +%s) - installed )) s"
