#!/usr/bin/env bash
# The shipped 270M config on one fold of the DLS split, on a lent GPU, in a few training variants side by side:
# torch vs 8-bit AdamW and bf16 / fp32 / fp16 compute (on a GPU `auto` means bf16 and 8-bit AdamW; on the CPU fp32
# and torch AdamW), to compare with the CPU's fold 0 (0.4518 cascade exact match). Needs transformers >= 5.25 on the
# machine (staging as in device_students.sh): 5.17 converts the GGUF's tokenizer wrongly and is refused.
#
#   bash tools/device_folds.sh SECONDS [VARIANT ...]      # default variants: adamw adam8 fp32
#
# Variants (all with the shipped configs/gemma-3-270m/qlora.yaml, fold 0 of the 5-fold split, 2 epochs):
#   adamw  torch AdamW (train.optimizer=adamw), bf16 compute     adam8  bitsandbytes 8-bit AdamW, bf16 compute
#   fp32   torch AdamW, fp32 compute (model.dtype=float32)        fp16   torch AdamW, fp16 compute (a T4's)
# Staging and calls as in tools/device_students.sh (the last call carries .dev/dls). Back under $OUT:
# folds.log (every run's output) and runs.tar.gz (each run's summary.json, oof.csv, fold metrics, run_config.yaml).
# Figures here: python -m infer evaluate --probs runs/gpu/NAME/oof.csv --labels ../shared/data/dls/train.csv
#   --baseline <the CPU run's oof.csv on the same rows>.
set -uo pipefail
BUDGET=${1:-480}
shift || true
VARIANTS=${*:-adamw adam8 fp32}
OUT=${OUT:-/tmp/out}
source tools/device_stage.sh
DLS=${DLS:-.dev/dls}
R=${R:-runs/gpu}
mkdir -p "$R"
end=$((SECONDS + BUDGET))
for v in $VARIANTS; do
    case $v in
    adamw) extra=(--set train.optimizer=adamw) ;;
    adam8) extra=(--set train.optimizer=adamw_8bit) ;;
    fp32) extra=(--set train.optimizer=adamw --set model.dtype=float32) ;;
    fp16) extra=(--set train.optimizer=adamw --set model.dtype=float16) ;;
    *) echo "unknown variant $v" >> "$OUT/folds.log"; continue ;;
    esac
    left=$((end - SECONDS))
    [ $left -gt 30 ] || { echo "no time left for $v" >> "$OUT/folds.log"; break; }
    echo "== $v (${left}s left)" >> "$OUT/folds.log"
    timeout $left ${PYTHON:-python3} -m train --config configs/gemma-3-270m/qlora.yaml \
        --set "data.train_csv=$DLS/train.csv" --set "data.label_names_csv=$DLS/trends_description.csv" \
        --set "cv.folds=[0]" --set "output_dir=$R/$v" "${extra[@]}" >> "$OUT/folds.log" 2>&1
    echo "== $v rc=$?" >> "$OUT/folds.log"
done
( cd "$R" && find . -maxdepth 3 -type f \( -name summary.json -o -name oof.csv -o -name 'oof.csv.meta.json' \
    -o -name metrics.json -o -name run_config.yaml -o -name folds.csv \) -print0 | tar --null -czf "$OUT/runs.tar.gz" -T - )
ls -la "$OUT"
