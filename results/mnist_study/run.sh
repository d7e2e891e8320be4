#!/usr/bin/env bash
# The MNIST study (README.md beside this file): every command that made a file here, in order.
# Re-running it re-creates the study: finished checkpoints are reused and stored cells are skipped,
# so an interrupted run resumes where it stopped. Usage, from the project root:
#   bash results/mnist_study/run.sh [PART ...]   (parts, run in this order: train eval more unet rules small
#                                                 budget beta3x beta01x3 beta01x3s1; default: train eval more unet rules small)
# `train` and `eval` made the first cells; `more` the other methods, ablations and a second seed; `unet` the
# DDIM U-Net of Table 6 with its own baseline; `rules` exit-rule variants of stored checkpoints; `small` the
# small model from scratch (Table 4); `budget` DeeDiff and the control at 3x the budget; `beta3x` DeeDiff at
# beta 0.3 with that budget; `beta01x3` at beta 0.1 with that budget, `beta01x3s1` its second seed. Hours on two cores.
# MNIST: the full set from ../shared/data/mnist-png.zip (or MNIST_ZIP=...). Checkpoints go to
# STUDY_RUNS (default ~/.cache/eebench/mnist_study/runs), outside the work tree so that they survive a new
# checkout; a new machine may or may not keep them (only the cells, committed here, are sure to survive),
# and a later part that needs an earlier part's checkpoint retrains it when it is gone.
set -euo pipefail
cd "$(dirname "$0")/../.."
MNIST_ZIP=${MNIST_ZIP:-../shared/data/mnist-png.zip}
STUDY_RUNS=${STUDY_RUNS:-$HOME/.cache/eebench/mnist_study/runs}
OUT=${STUDY_OUT:-results/mnist_study}  # STUDY_OUT: store the cells elsewhere (a checkout kept apart while the code changes)
common=(--profile study --dataset mnist --dataset-path "$MNIST_ZIP" --set run.results="$OUT"
        --set run.runs_dir="$STUDY_RUNS" --set run.experiment=mnist_study)
# the 3x budget (`budget`, `beta3x`), and a refit: a checkpoint's UEMs trained on alone for 500 steps on its
# frozen backbone (model.init_from names the checkpoint)
longer=(--set train.steps=3000 --set run.results="$OUT/budget")
refit_uems=(--set train.steps=0 --set train.warmup_steps=0 --set train.exit_calibration_steps=500)
parts=("${@:-train eval more unet rules small}")
parts=" ${parts[*]} "

if [[ $parts == *" train "* ]]; then
  # 1. equal budgets from the same baseline checkpoint (profile study: 1,000 steps of 64 + 100 steps
  #    calibrating the exit modules where a method has any); baseline fine-tuned the same way is the control
  bench train --method deediff "${common[@]}"
  bench train --method baseline "${common[@]}"
fi

if [[ $parts == *" eval "* ]]; then
  # 2. DeeDiff: full depth and a threshold sweep (its operating points)
  bench eval --method deediff "${common[@]}" --thresholds full,0.03,0.05,0.07,0.1,0.14,0.2
  # 3. the control: the baseline fine-tuned the same way, at the protocol's 25 DPM-Solver steps
  bench eval --method baseline "${common[@]}" --thresholds full
  # 4. static exits of the same DeeDiff checkpoint (Table 5: layers 7, 9, 11 of 13 = exits 6, 8, 10)
  bench eval --method static "${common[@]}" --thresholds 6,8,10
  # 5. the matched-compute baseline: the same control at fewer sampler steps
  for steps in 20 15 10; do
    bench eval --method baseline "${common[@]}" --steps "$steps" --thresholds full
  done
fi

# train (or reuse) the checkpoint of a method, then measure it: train_eval THRESHOLDS OPTIONS...
train_eval() {
  local thresholds=$1; shift
  bench train "${common[@]}" "$@"
  bench eval "${common[@]}" "$@" --thresholds "$thresholds"
}

if [[ $parts == *" more "* ]]; then
  # 6. the other methods under the same budget, and DeeDiff's ablations (Table 3) and loss forms
  train_eval full,0.05,0.1,0.15,0.2,0.3,0.4 --method bertxit
  # what the layer-wise loss costs the full-depth output: DeeDiff with beta of eq. 13 at 0.3 and 0.1 instead of 1
  train_eval full,0.03,0.05,0.07,0.1,0.14,0.2 --method deediff --set methods.deediff.beta_ual=0.3
  train_eval full,0.03,0.05,0.07,0.1,0.14,0.2 --method deediff --set methods.deediff.beta_ual=0.1
  train_eval full,0.999,0.995,0.99,0.98,0.95,0.9 --method calm
  train_eval full,0.03,0.05,0.07,0.1,0.14,0.2 --method deediff --set methods.deediff.layerwise_loss=false
  train_eval full,0.03,0.05,0.07,0.1,0.14,0.2 --method deediff --set methods.deediff.shared_uem=true
  train_eval full,0.03,0.05,0.07,0.1,0.14,0.2 --method deediff --set methods.deediff.loss_form=paper
  train_eval full,0.5,1.0,1.5 --method static --set methods.static.schedule=time
  train_eval full --method pruning
  # 7. a second seed at the operating points
  train_eval full,0.05,0.1 --method deediff --seed 1
  train_eval full --method baseline --seed 1
  # 7b. an exit signal in data space (ours, not the paper's; README "An exit signal in data space"): the
  #     UEMs of step 1's DeeDiff checkpoint (seed 0) trained on for 500 steps on its frozen EMA backbone,
  #     to tanh|x0_i - x0| (uem_target: data) and, as the control of the refit, to eq. 9's tanh|g_i - eps|.
  #     Their cells go to refit/, a store of their own, so that the paper's tables never take a refit
  #     for DeeDiff as it is trained
  deediff_ckpt=$(bench train --method deediff "${common[@]}" | tail -n 1)
  refit=(--set model.init_from="$deediff_ckpt" "${refit_uems[@]}" --set run.results="$OUT/refit")
  train_eval full,0.02,0.05,0.1,0.15,0.2,0.3 --method deediff "${refit[@]}" --set methods.deediff.uem_target=data
  train_eval full,0.03,0.05,0.07,0.1 --method deediff "${refit[@]}" --set methods.deediff.uem_target=noise
  #     and to the distance from the final exit's prediction, tanh|g_i - g_N| (uem_target: final, ours):
  #     eq. 9's error includes the final exit's own, which exiting cannot lower
  train_eval full,0.02,0.05,0.1,0.15,0.2,0.3 --method deediff "${refit[@]}" --set methods.deediff.uem_target=final
fi

if [[ $parts == *" unet "* ]]; then
  # 8. Table 6: the DDIM U-Net (ddim_tiny, 1.1 M parameters, 7 exits). Its baseline first, from scratch on
  #    full MNIST with the small profile's recipe (lr 1e-3 after 500 warm-up steps, EMA 0.999): 6,000 steps
  #    of 64 (384,000 images; 69 min here on one core at 95 images/s, resumable from its last.pt). Sized to fit
  #    one working session, because the runs folder does not outlive the machine it was made on. Then
  #    DeeDiff and the baseline fine-tuned from it with the study's recipe and budget, and measured like the
  #    U-ViT cells (DPM-Solver 25 on the U-Net's discrete linear schedule). Then a probe: the exit heads alone
  #    trained on for 400 steps on DeeDiff's frozen backbone (unet_exit_probe.py, output unet_exit_probe.txt).
  unet=(--backbone ddim_tiny --set model.schedule=linear)
  unet_base=$(bench train --method baseline --profile small --dataset mnist --dataset-path "$MNIST_ZIP" "${unet[@]}" \
                --set train.batch_size=64 --set train.steps=6000 --set train.ckpt_every=500 \
                --set run.results="$OUT/unet_baseline" --set run.runs_dir="$STUDY_RUNS" \
                --set run.experiment=mnist_study_unet_baseline | tail -n 1)
  #    Thresholds: the U-ViT's 0.03 and then 0.995, because the U-Net's UEMs say u = 0.99-1.0 at every exit but
  #    the last (its exits' noise predictions have MSE 0.34-0.99 after the fine-tune; README, "The DDIM U-Net"):
  #    nothing exits below about 0.99, so 0.05-0.2 would repeat full depth
  train_eval full,0.03,0.995 --method deediff "${unet[@]}" --set model.init_from="$unet_base"
  train_eval full --method baseline "${unet[@]}" --set model.init_from="$unet_base"
  #    and with Table 6's own sampler, DDIM at 50 steps
  bench eval --method deediff "${common[@]}" "${unet[@]}" --set model.init_from="$unet_base" --sampler ddim \
    --steps 50 --thresholds full,0.995
  bench eval --method baseline "${common[@]}" "${unet[@]}" --set model.init_from="$unet_base" --sampler ddim \
    --steps 50 --thresholds full
  #    and at the paper's other step count, DDIM 100
  bench eval --method baseline "${common[@]}" "${unet[@]}" --set model.init_from="$unet_base" --sampler ddim \
    --steps 100 --thresholds full
  bench eval --method deediff "${common[@]}" "${unet[@]}" --set model.init_from="$unet_base" --sampler ddim \
    --steps 100 --thresholds full,0.995
  unet_deediff=$(bench train --method deediff "${common[@]}" "${unet[@]}" --set model.init_from="$unet_base" | tail -n 1)
  unet_control=$(bench train --method baseline "${common[@]}" "${unet[@]}" --set model.init_from="$unet_base" | tail -n 1)
  cp "$(dirname "$unet_base")/loss.csv" "$OUT/train_loss_unet_baseline.csv"   # the training losses, per 10-50 steps
  cp "$(dirname "$unet_deediff")/loss.csv" "$OUT/train_loss_unet_deediff.csv"
  cp "$(dirname "$unet_control")/loss.csv" "$OUT/train_loss_unet_control.csv"
  python results/mnist_study/unet_exit_probe.py "$unet_deediff" --dataset-path "$MNIST_ZIP" --steps 400 \
    > "$OUT/unet_exit_probe.txt"
fi

if [[ $parts == *" rules "* ]]; then
  # 9. exit rules, which act only when sampling: measured on the checkpoints above, nothing retrains (the
  #    training hash leaves them out, a row's hash takes them in). DeeDiff with the official code's
  #    batch-mean rule (the whole batch exits on its mean uncertainty) and without patience (an exit at the
  #    first crossing); CALM comparing consecutive exits' noise predictions instead of their hidden states
  train_eval full,0.03,0.05,0.07,0.1 --method deediff --set methods.deediff.exit_rule=batch_mean
  train_eval full,0.03,0.05,0.07 --method deediff --set methods.deediff.patience=0
  train_eval full,0.9999,0.9995,0.999,0.995,0.99,0.98,0.95,0.9,0.8 --method calm --set methods.calm.compare=prediction
fi

if [[ $parts == *" small "* ]]; then
  # 10. Table 4: the 7-block model from scratch with the baseline's budget (profile study, per_method small:
  #    41,700 steps of 64; about 8 hours here, resumable from its last.pt), last because it is the longest
  train_eval full --method small
fi

if [[ $parts == *" budget "* ]]; then
  # 11. does the layer-wise loss's cost to the full-depth output shrink with training? DeeDiff and the
  #     control with 3x the study's budget (3,000 steps of 64 from the same baseline; 1 h 50 min each here
  #     side by side on one core each, OMP_NUM_THREADS=1). Thresholds 0.055, 0.0575, 0.06 were added after the cliff.
  #     The paper fine-tunes for about 200k steps. Cells in budget/, a store of their own (the tables
  #     compare equal budgets)
  train_eval full,0.03,0.05,0.055,0.0575,0.06,0.07,0.1,0.14,0.2 --method deediff "${longer[@]}"
  train_eval full --method baseline "${longer[@]}"
  long_deediff=$(bench train --method deediff "${common[@]}" "${longer[@]}" | tail -n 1)
  long_control=$(bench train --method baseline "${common[@]}" "${longer[@]}" | tail -n 1)
  cp "$(dirname "$long_deediff")/loss.csv" "$OUT/budget/train_loss_deediff.csv"   # the training losses
  cp "$(dirname "$long_control")/loss.csv" "$OUT/budget/train_loss_baseline.csv"
  #     the exit signal refitted at this budget (README "A refitted exit signal meets the layer-ratio bar"): the
  #     3x checkpoint's UEMs trained on for 500 steps, alone on its frozen backbone, to tanh|g_i - g_N|
  #     (uem_target: final, ours) as step 7b did at 1x; thresholds from trajectory_refit.py's scan
  refit3=(--set model.init_from="$long_deediff" "${refit_uems[@]}" --set run.results="$OUT/budget")
  train_eval full,0.015,0.02,0.025,0.03,0.035,0.04 --method deediff "${refit3[@]}" --set methods.deediff.uem_target=final
  #     the refitted checkpoint on fresh sampling noise (noise seed 1; the thresholds were chosen on seed 0's)
  python results/mnist_study/fresh_noise.py "$(bench train --method deediff "${common[@]}" "${refit3[@]}" \
    --set methods.deediff.uem_target=final | tail -n 1)" --thresholds 0.025,0.03 --noise-seed 1 \
    --csv "$OUT/budget/fresh_noise.csv" > "$OUT/budget/fresh_noise.txt"
  #     a second seed (training and sampling seed 1) of DeeDiff, its refit and the control: the two 3,000-step
  #     trainings side by side, one core each (OMP_NUM_THREADS=1), about 2 h
  long_deediff1=$(bench train --method deediff "${common[@]}" "${longer[@]}" --seed 1 | tail -n 1)
  bench train --method baseline "${common[@]}" "${longer[@]}" --seed 1
  bench eval --method baseline "${common[@]}" "${longer[@]}" --seed 1 --thresholds full
  refit3_seed1=(--set model.init_from="$long_deediff1" "${refit_uems[@]}" --set run.results="$OUT/budget" --seed 1)
  train_eval full,0.025,0.03,0.035 --method deediff "${refit3_seed1[@]}" --set methods.deediff.uem_target=final
  #     the matched-compute comparison at this budget: the control at fewer sampler steps
  for steps in 20 15 10; do
    bench eval --method baseline "${common[@]}" "${longer[@]}" --steps "$steps" --thresholds full
  done
  #     the cliff, sample by sample (failed_samples.py; README "The cliff is a trap"): which of 200 samples end
  #     as static at each threshold, where they exit, and (at 0.06) which calls' exits do the damage and what
  #     the UEMs say on the trapped samples' inputs
  for thr in 0.05 0.055 0.0575 0.07; do
    python results/mnist_study/failed_samples.py "$long_deediff" --threshold "$thr" --window 0 \
      --grid "$OUT/budget/grids/failed_thr$thr.png" > "$OUT/budget/failed_samples_thr$thr.txt"
  done
  python results/mnist_study/failed_samples.py "$long_deediff" --threshold 0.06 --window 5 --probe \
    --grid "$OUT/budget/grids/failed_thr0.06.png" > "$OUT/budget/failed_samples_thr0.06.txt"
  #     UEMs refitted on the sampler's own inputs against the same refit on training inputs (trajectory_refit.py;
  #     README "UEMs calibrated on the sampler's own inputs"): about 35 min on two cores
  python results/mnist_study/trajectory_refit.py "$long_deediff" --csv "$OUT/budget/trajectory_refit.csv" \
    --grid-dir "$OUT/budget/grids" > "$OUT/budget/trajectory_refit.txt"
fi

if [[ $parts == *" beta3x "* ]]; then
  # 12. both bars at once? At 1x, beta 0.3 (eq. 13) cut the full-depth cost from 1.62x the control to 1.27x;
  #     at 3x, beta 1 is at 1.28x. DeeDiff at beta 0.3 with the 3x budget (about 1 h 35 min on two cores),
  #     its UEMs refitted as in step 11 (uem_target: final, 500 steps; the backbone stays as trained, so the
  #     refit's full-depth cell is the training's), and the refit's seed-0 threshold grid without its 0.015
  #     (fixed before this run; 0.0375 added after 0.035 and 0.04 bracketed the bar; the control is step
  #     11's, beta does not touch it). Cells in budget/
  beta3=(--set methods.deediff.beta_ual=0.3)
  long_beta3=$(bench train --method deediff "${common[@]}" "${longer[@]}" "${beta3[@]}" | tail -n 1)
  cp "$(dirname "$long_beta3")/loss.csv" "$OUT/budget/train_loss_deediff_beta0.3.csv"
  refit3_beta3=(--set model.init_from="$long_beta3" "${refit_uems[@]}" --set run.results="$OUT/budget")
  train_eval full,0.02,0.025,0.03,0.035,0.0375,0.04 --method deediff "${refit3_beta3[@]}" "${beta3[@]}" \
    --set methods.deediff.uem_target=final
fi

if [[ $parts == *" beta01x3 "* ]]; then
  # 13. the full-depth bar: at 1x, beta 0.1 cut the full-depth cost to 1.14x the control (beta 0.3: 1.27x);
  #     at 3x, beta 0.3 is at 1.15x. DeeDiff at beta 0.1 with the 3x budget (about 1 h 30 min on two cores),
  #     its UEMs refitted as in step 12, and a grid fixed before this run: step 12's without 0.0375, plus
  #     0.045 and 0.05 (weaker exit heads need higher thresholds for the same layer ratio). Cells in budget/
  beta01=(--set methods.deediff.beta_ual=0.1)
  long_beta01=$(bench train --method deediff "${common[@]}" "${longer[@]}" "${beta01[@]}" | tail -n 1)
  cp "$(dirname "$long_beta01")/loss.csv" "$OUT/budget/train_loss_deediff_beta0.1.csv"
  refit3_beta01=(--set model.init_from="$long_beta01" "${refit_uems[@]}" --set run.results="$OUT/budget")
  train_eval full,0.02,0.025,0.03,0.035,0.04,0.045,0.05 --method deediff "${refit3_beta01[@]}" "${beta01[@]}" \
    --set methods.deediff.uem_target=final
fi

if [[ $parts == *" beta01x3s1 "* ]]; then
  # 14. a second seed of step 13 (training and sampling seed 1): does the full-depth bar hold across seeds?
  #     The control's own two seeds at 3x are step 11's (40.54, 42.28). About 2 h on two cores; the grid,
  #     fixed before this run, is step 13's points around its best and its layer ratio 0.7
  beta01=(--set methods.deediff.beta_ual=0.1)
  long_beta01s1=$(bench train --method deediff "${common[@]}" "${longer[@]}" "${beta01[@]}" --seed 1 | tail -n 1)
  cp "$(dirname "$long_beta01s1")/loss.csv" "$OUT/budget/train_loss_deediff_beta0.1_seed1.csv"
  #     Threshold 0.02, last, was added after the others had run: seed 0's anomaly there (more compute, worse
  #     FID; README "The full-depth bar"), with late_exits.py (about 5 min): do late exits in the first calls
  #     do more damage than early ones?
  refit3_beta01s1=(--set model.init_from="$long_beta01s1" "${refit_uems[@]}" --set run.results="$OUT/budget" --seed 1
                   "${beta01[@]}" --set methods.deediff.uem_target=final)
  refit_beta01s1=$(bench train --method deediff "${common[@]}" "${refit3_beta01s1[@]}" | tail -n 1)
  bench eval --method deediff "${common[@]}" "${refit3_beta01s1[@]}" --thresholds full,0.025,0.04,0.045,0.05,0.02
  python results/mnist_study/late_exits.py "$refit_beta01s1" --thresholds 0.02,0.025 > "$OUT/budget/late_exits_seed1.txt"
fi
