#!/usr/bin/env bash
# The Gemma-3-270M study (RESULTS.md), exactly as run: from the repository root,
#   bash experiments/gemma3-270m/run.sh
# on 2 shared CPU cores (nice'd). Every command is a Hydra sweep that resumes: rerunning this
# script skips finished runs (results.json "status": "done") and continues unfinished ones.
# Wall times of each step go to experiments/gemma3-270m/times.log.
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LOG=experiments/gemma3-270m/times.log
DATA=../shared/data

# The ablation presets set only quant; setting=gemma3_cpu (hbllm/conf/setting/gemma3_cpu.yaml) gives
# them the study's model, calibration and evaluation, as experiment=gemma3_study has them.

step() {  # step NAME CMD...: run CMD, append its wall time to $LOG
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $(date -u +%H:%M:%S) start $name: $*" | tee -a "$LOG"
  nice -n 10 "$@"
  local rc=$?
  echo "== $(date -u +%H:%M:%S) end $name: rc=$rc wall=$(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

# 1. Main comparison: the preset's 7 methods, cheapest and most informative first.
step methods hbllm -m experiment=gemma3_study data.local_dir=$DATA
# 1b. Seed repeats (RESULTS.md, "Noise"): hbllm_row, billm, hbllm_col over seeds 0-4, one thread,
#    sweep gemma3_seeds (see run_seeds.sh); hbllm-report groups them per method.
step seeds bash experiments/gemma3-270m/run_seeds.sh
# 2. Ablations of hbllm_row. Only the non-default value is run: the default (l2, row) is
#    exactly the hbllm_row run of step 1 (same resolved config), compared in RESULTS.md.
step ablation-salient hbllm -m experiment=ablation_salient setting=gemma3_cpu data.local_dir=$DATA quant.salient_metric=l1
step ablation-grouping hbllm -m experiment=ablation_grouping setting=gemma3_cpu data.local_dir=$DATA quant.partition=global
# 3. Zero-shot on the one local task (openbookqa, first 100 questions): fp16, billm, hbllm_row
#    (quantized again in their own sweep directory; no perplexity).
if [ "${ZEROSHOT:-0}" = 1 ]; then
  step zeroshot hbllm -m experiment=gemma3_study data.local_dir=$DATA quant=fp16,billm,hbllm_row \
    hydra.job.name=gemma3_zeroshot "eval.datasets=[]" eval.zeroshot.enabled=true \
    "eval.zeroshot.tasks=[openbookqa]" eval.zeroshot.local_dir=$DATA/zeroshot eval.zeroshot.limit=100
fi
# 3b. The field's other baselines in the same setting (sweep gemma3_methods, OMP_NUM_THREADS=1:
#     GPTQ's column loop is thousands of tiny ops, which multi-threading on a loaded 2-core
#     machine slows ~15x), most informative first; then the accuracy-vs-bits frontier over all
#     runs kept in runs/ (experiments/gemma3-270m/frontier/).
step methods16 env OMP_NUM_THREADS=1 hbllm -m experiment=gemma3_study data.local_dir=$DATA \
  hydra.job.name=gemma3_methods \
  quant=gptq_w3g128,gptq_w2g128,pbllm,rtn_w3g128,gptq_w4g128,rtn_w2g128,rtn_w4g128,pbllm_lf70,arbllm_x,arbllm_rc,hbllm_row_b64,billm_b64,hbllm_row_b256,billm_b256,pbllm_lf80,pbllm_lf95
# 4. The report (tables, CSV, plots).
hbllm-report multirun/gemma3_study/gemma3-270m multirun/ablation_salient/gemma3-270m \
  multirun/ablation_grouping/gemma3-270m multirun/gemma3_seeds/gemma3-270m -o experiments/gemma3-270m/report
# 5. Keep each run's results.json and resolved config beside RESULTS.md (multirun/ is git-ignored):
#    runs/<sweep>/<method>/<calib>-<hash>/.
for sweep in gemma3_study gemma3_seeds gemma3_zeroshot ablation_salient ablation_grouping gemma3_methods; do
  [ -d multirun/$sweep/gemma3-270m ] || continue
  find multirun/$sweep/gemma3-270m -name results.json -not -path '*/wandb/*' | while read -r f; do
    run=$(dirname "$f"); d=experiments/gemma3-270m/runs/$sweep/$(basename "$(dirname "$run")")/$(basename "$run")
    mkdir -p "$d" && cp "$f" "$d/" && cp "$run/.hydra/config.yaml" "$d/" 2>/dev/null
  done
done
# 6. The frontier over the main comparison and the other baselines (perplexity vs full and paper
#    bits, Pareto front; the ablations are left out: their runs share the hbllm_row label).
hbllm-report experiments/gemma3-270m/runs/gemma3_study experiments/gemma3-270m/runs/gemma3_methods \
  -o experiments/gemma3-270m/frontier
