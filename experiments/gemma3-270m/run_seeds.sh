#!/usr/bin/env bash
# The seed repeats of the Gemma-3-270M study (RESULTS.md, "Noise"): hbllm_row, billm and hbllm_col
# over calibration seeds 1-4 (seed 0 is the main study's run, same code and thread count), in the
# study setting, one run after another, seeds outermost so every method has the same n when
# stopped early. From the repository root:
#   bash experiments/gemma3-270m/run_seeds.sh
# Each command is a one-run Hydra sweep into multirun/gemma3_study/gemma3-270m, so a rerun skips
# finished runs. Equivalent single sweep (Hydra's own order):
#   hbllm -m experiment=gemma3_study data.local_dir=../shared/data quant=hbllm_row,billm,hbllm_col seed=1,2,3,4
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LOG=${LOG:-experiments/gemma3-270m/times_seeds.log}
for seed in ${SEEDS:-1 2 3 4}; do
  for quant in hbllm_row billm hbllm_col; do
    t0=$(date +%s)
    echo "== $(date -u +%H:%M:%S) start $quant seed=$seed" | tee -a "$LOG"
    nice -n 10 hbllm -m experiment=gemma3_study data.local_dir=../shared/data quant=$quant seed=$seed
    echo "== $(date -u +%H:%M:%S) end $quant seed=$seed: rc=$? wall=$(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  done
done
