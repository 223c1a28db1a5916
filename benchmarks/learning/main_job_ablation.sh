#!/bin/sh
# Which change buys what on the default dataset (glyphs): 400 steps of P = 8 x K = 8,
# small CNN, Adam 1e-3, one thread, seed 0 (one seed each: a 2-core machine shared by several jobs).
# Output: benchmarks/results/learning/main_job.{txt,jsonl}. Run from the repository root:
#   sh benchmarks/learning/main_job_ablation.sh
set -e
OUT=benchmarks/results/learning
mkdir -p $OUT
run() { python -W ignore benchmarks/learning/main_job.py --dataset glyphs --steps 400 --seeds 0 \
          --json $OUT/main_job.jsonl "$@" | tee -a $OUT/main_job.txt; }
OLD='{"k": 32, "normalize_inputs": true, "bce_weight": 0.0}'   # the loss of pddm-ext train before the options against the collapse
NEW='{"k": 32}'   # PDDMLoss's defaults with pddm-ext train's mine_k = P K / 2
run --label "old loss, constant lr, no augmentation" --options "$OLD"
run --label "new loss, constant lr, no augmentation" --options "$NEW"
run --label "new loss + augmentation + one-cycle" --options "$NEW" --augment --schedule onecycle
run --label "batch-hard (beta 0.2) + augmentation + one-cycle" --loss batch-hard --augment --schedule onecycle
