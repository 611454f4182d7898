#!/usr/bin/env bash
# The amazon-beauty evidence of docs/reproduction.md, resumable: rerunning it continues every study
# where it stopped (finished runs are skipped, a killed run resumes from its last epoch checkpoint).
# Long: days of CPU time on a laptop, hours on a GPU. Run it in the background:
#
#   nohup bash scripts/reproduce_beauty.sh > results/reproduce_beauty.log 2>&1 &
#
# then regenerate the committed evidence at any point (partial studies give partial tables):
#
#   bash scripts/reproduce_beauty.sh --report
set -euo pipefail
cd "$(dirname "$0")/.."
export HARNESS_DATA_DIR="${HARNESS_DATA_DIR:-../shared/data}"
PY="${PYTHON:-.venv/bin/python}"
WORKERS="${WORKERS:-2}"

if [ "${1:-}" != "--report" ]; then
  for study in paper_beauty_ties low_dim_beauty paper_beauty; do  # the paper's conditions first
    "$PY" -m harness run "studies/$study.yaml" --workers "$WORKERS" --no-live
  done
fi

# committed stores: only these studies' runs, metrics and per-user ranks (no checkpoints)
"$PY" -m harness export paper_beauty --out reports/paper_beauty/store
"$PY" -m harness report paper_beauty --tracking-uri sqlite:///reports/paper_beauty/store/mlflow.db
if "$PY" -m harness export paper_beauty_ties --out reports/paper_beauty_ties/store; then
  "$PY" -m harness report paper_beauty_ties \
    --tracking-uri sqlite:///reports/paper_beauty_ties/store/mlflow.db
fi
if "$PY" -m harness export paper_beauty_ties low_dim_beauty --out reports/low_dim_beauty/store; then
  "$PY" -m harness report paper_beauty_ties low_dim_beauty --name low_dim_beauty --reference ssd4rec \
    --tracking-uri sqlite:///reports/low_dim_beauty/store/mlflow.db
fi
