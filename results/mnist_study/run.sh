#!/usr/bin/env bash
# The MNIST study (README.md beside this file): every command that made a file here, in order.
# Re-running it re-creates the study: finished checkpoints are reused and stored cells are skipped,
# so an interrupted run resumes where it stopped. Usage, from the project root:
#   bash results/mnist_study/run.sh [PART ...]      (parts: train eval; default: all)
# MNIST: the full set from ../shared/data/mnist-png.zip (or MNIST_ZIP=...). Checkpoints go to
# STUDY_RUNS (default ~/.cache/eebench/mnist_study/runs), outside the work tree so that they survive it.
set -euo pipefail
cd "$(dirname "$0")/../.."
MNIST_ZIP=${MNIST_ZIP:-../shared/data/mnist-png.zip}
STUDY_RUNS=${STUDY_RUNS:-$HOME/.cache/eebench/mnist_study/runs}
OUT=results/mnist_study
common=(--profile study --dataset mnist --dataset-path "$MNIST_ZIP" --set run.results="$OUT"
        --set run.runs_dir="$STUDY_RUNS" --set run.experiment=mnist_study)
parts=("${@:-train eval}")
parts=" ${parts[*]} "

if [[ $parts == *" train "* ]]; then
  # 1. equal budgets from the same baseline checkpoint (profile study: 1,000 steps of 64 + 100 steps
  #    calibrating the exit modules where a method has any); baseline fine-tuned the same way is the control
  bench train --method deediff "${common[@]}"
  bench train --method baseline "${common[@]}"
fi

if [[ $parts == *" eval "* ]]; then
  # 2. the fine-tuned baseline at the protocol's 25 DPM-Solver steps and at fewer steps (matched compute)
  for steps in 25 20 15 10; do
    bench eval --method baseline "${common[@]}" --steps "$steps" --thresholds full
  done
  # 3. DeeDiff: full depth and a threshold sweep (its operating points)
  bench eval --method deediff "${common[@]}" --thresholds full,0.3,0.25,0.2,0.15,0.1,0.075,0.05
  # 4. static exits of the same DeeDiff checkpoint (Table 5: layers 7, 9, 11 of 13 = exits 6, 8, 10; and 4)
  bench eval --method static "${common[@]}" --thresholds 4,6,8,10
fi
