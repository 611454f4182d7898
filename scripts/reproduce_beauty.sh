#!/usr/bin/env bash
# The amazon-beauty evidence of docs/reproduction.md, resumable: rerunning it continues every study
# where it stopped (finished runs are skipped, a killed run resumes from its last epoch checkpoint).
# Long: days of CPU time on a laptop, hours on a GPU. Run it in the background:
#
#   nohup bash scripts/reproduce_beauty.sh > results/reproduce_beauty.log 2>&1 &
#
# then regenerate the committed evidence at any point (partial studies give partial tables; commit
# it before the machine goes: its stores carry the unfinished runs to the next clone):
#
#   bash scripts/reproduce_beauty.sh --report
set -euo pipefail
cd "$(dirname "$0")/.."
export HARNESS_DATA_DIR="${HARNESS_DATA_DIR:-../shared/data}"
PY="${PYTHON:-.venv/bin/python}"
WORKERS="${WORKERS:-2}"

if [ "${1:-}" != "--report" ]; then
  # a fresh clone has no results/: the committed stores bring back every run recorded so far and
  # the last checkpoint of each unfinished one, so finished runs are skipped and the unfinished
  # continue from their last epoch (importing again changes nothing)
  for store in reports/paper_beauty/store reports/low_dim_beauty/store reports/time_encoding_beauty/store \
    reports/chunk_size/store reports/paper_beauty_file_order/store; do
    if [ -f "$store/experiments.json" ] || [ -f "$store/mlflow.db" ]; then "$PY" -m harness import "$store"; fi
  done
  # one queue of final runs (a worker with nothing left to claim in a study goes on to the next
  # instead of waiting for the other worker's last run), taken seed round by seed round: every
  # study's first seeds (the short chunk-size check, the low-dimension grid, the time encodings, the
  # costliest baselines at hidden 64), then their second seeds, then their third
  "$PY" -m harness run studies/chunk_size_beauty.yaml studies/low_dim_beauty.yaml studies/low_dim_beauty_more.yaml \
    studies/time_encoding_beauty.yaml studies/paper_beauty.yaml --workers "$WORKERS" --no-live
  # the file-order ablation goes beyond the issues' runs: after all of them, not in their rounds
  "$PY" -m harness run studies/paper_beauty_file_order.yaml --workers "$WORKERS" --no-live
fi

# committed stores: these studies' runs, metrics and per-user ranks, and the last checkpoint of each
# unfinished run of the store's own study (so that another clone resumes it); a study not in the
# tracking store yet is skipped (export says so)
report() {  # report NAME "STUDY..." "CARRIED..." [REPORT OPTION...]: export the studies (with the
  # checkpoints of the CARRIED studies' unfinished runs), then write reports/NAME
  local name="$1" studies="$2" carried="$3"; shift 3
  # shellcheck disable=SC2086  # the study lists are meant to split
  if "$PY" -m harness export $studies --out "reports/$name/store" --checkpoints $carried; then
    "$PY" -m harness report $studies --name "$name" "$@" --tracking-uri "reports/$name/store"
  fi
}
report paper_beauty paper_beauty paper_beauty
report paper_beauty_file_order paper_beauty_file_order paper_beauty_file_order
# --confirm: the question low_dim_beauty was run for (issue 21: does TiM4Rec's time path recover what
# SSD4Rec* loses at low width?) as its own family, TiM4Rec against SSD4Rec* at each width on NDCG@10
# (named after the results were seen: docs/statistics.md#multiple-comparisons-and-intervals)
report low_dim_beauty "paper_beauty low_dim_beauty low_dim_beauty_more" "low_dim_beauty low_dim_beauty_more" \
  --reference ssd4rec --confirm tim4rec
# time_encoding_cost is the cost side of the time encodings, every variant side by side in one run
# (CPU here; repeats interleaved across the cells):
#   python -m harness bench --dataset amazon-beauty --models "ssd4rec,tim4rec,tim4rec-log=tim4rec:time_encoding=log,\
#     tim4rec-causal=tim4rec:time_encoding=causal,sasrec,tisasrec,tisasrec-personal=tisasrec:time_encoding=personal" \
#     --hidden 64 --protocol prefix,all_positions --batch-size 256 --repeats 9 --warmup 2 --threads 2 \
#     --track --experiment time_encoding_cost
report time_encoding_beauty "paper_beauty time_encoding_beauty time_encoding_cost" time_encoding_beauty \
  --reference tim4rec --bench-experiment time_encoding_cost
# chunk_size_cost is the cost side of the chunk-size check, measured once per machine (CPU here, on the torch
# chunked scan: the C++ scan does not chunk; the repeats interleaved across the cells):
#   python -m harness bench --models ssd4rec,tim4rec --hidden 64 --seq-len 50,200 --chunk-size 8,16,32,64,128,256 \
#     --backend torch --batch-size 256 --repeats 5 --warmup 1 --threads 2 --track --experiment chunk_size_cost
report chunk_size "chunk_size_beauty chunk_size_cost" chunk_size_beauty --bench-experiment chunk_size_cost
# docs/findings.md states the numbers of these reports: render it again from their tables
"$PY" scripts/findings.py
