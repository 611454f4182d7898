#!/usr/bin/env bash
# Gather on this (CPU, networked) machine what scripts/gpu_check.py needs on the GPU machine, which reaches no
# package registry: .gpu-carry/wheels (mamba-ssm's pure-Python wheel; pydantic for the harness, absent from
# that image) and .gpu-carry/data/amazon-beauty. The GPU machine's image already has torch (CUDA), triton,
# einops, pandas, scipy, pyyaml, rich, filelock and matplotlib; the harness runs there without mlflow/optuna
# (`train --no-track`, `bench`). The device command that uses it is in docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
PY=.venv/bin/python
DATA="${HARNESS_DATA_DIR:-../shared/data}"
PYTHON_VERSION=3.12  # the GPU image's python3
rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/build" "$CARRY/data"
mamba_pin=$("$PY" -c 'import tomllib; print(next(p for p in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["interpreter"] if p.startswith("mamba-ssm")))')
"$PY" -m pip install -q --target "$CARRY/build" wheel
PYTHONPATH="$CARRY/build" MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation "$mamba_pin" -w "$CARRY/wheels"
rm -rf "$CARRY/build"
# pydantic and its own needs, binary wheels for the GPU machine's python (the versions this .venv runs)
pins=$("$PY" -c 'from importlib.metadata import version as v; print(" ".join(f"{n}=={v(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY/wheels" $pins
mkdir -p "$CARRY/data/amazon-beauty" && cp "$DATA/amazon-beauty/amazon-beauty.inter" "$CARRY/data/amazon-beauty/"
echo "gpu_prepare: $(ls "$CARRY/wheels" | tr '\n' ' ')($(du -sh "$CARRY" | cut -f1)) in $CARRY"
