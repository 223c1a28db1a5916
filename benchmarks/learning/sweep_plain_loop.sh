#!/bin/sh
# The plain loop over the loss / unit variants, 5 seeds each (scratch loss in plain PyTorch).
# Output: benchmarks/results/learning/plain_loop_sweep.{txt,jsonl}. About 10 minutes on one core.
# Run from the repository root: sh benchmarks/learning/sweep_plain_loop.sh
set -e
OUT=benchmarks/results/learning
mkdir -p $OUT
rm -f $OUT/plain_loop_sweep.jsonl $OUT/plain_loop_sweep.txt
run() { python benchmarks/learning/plain_loop.py --seeds 0 1 2 3 4 --json $OUT/plain_loop_sweep.jsonl "$@" | tee -a $OUT/plain_loop_sweep.txt; }
for form in "" "--distance-aware"; do
  for pairs in hardest1 all; do
    for neg in hardest semihard; do
      for bce in 0 1; do
        run $form --pairs $pairs --negatives $neg --bce $bce
      done
    done
    run $form --pairs $pairs --warmup
  done
done
