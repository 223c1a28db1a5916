#!/bin/sh
# Issue 13 item 5: which change buys what on the default dataset (glyphs), 1 seed (0) each, 400 steps of
# P = 8 x K = 8, small CNN, Adam 1e-3, one thread per run. Output: benchmarks/results/learning/main_job.{txt,jsonl}.
# Run from the repository root: sh benchmarks/learning/main_job_ablation.sh [group]
set -e
OUT=benchmarks/results/learning
mkdir -p $OUT
run() { python -W ignore benchmarks/learning/main_job.py --dataset glyphs --steps 400 --seeds 0 \
          --json $OUT/main_job.jsonl "$@" | tee -a $OUT/main_job.txt; }
OLD='{"k": 32, "normalize_inputs": true, "bce_weight": 0.0}'   # the previous pddm-ext train loss
NEW='{}'                                                        # PDDMLoss's defaults
case "${1:-all}" in
  baselines|all)
    run --label "old loss, constant lr, no augmentation" --options "$OLD"
    run --label "old loss + augmentation + one-cycle" --options "$OLD" --augment --schedule onecycle
    run --label "batch-hard (beta 0.2) + augmentation + one-cycle" --loss batch-hard --augment --schedule onecycle
    ;;
esac
case "${1:-all}" in
  new|all)
    run --label "new loss defaults, constant lr, no augmentation" --options "$NEW"
    run --label "new loss defaults + augmentation" --options "$NEW" --augment
    run --label "new loss defaults + augmentation + one-cycle" --options "$NEW" --augment --schedule onecycle
    ;;
esac
