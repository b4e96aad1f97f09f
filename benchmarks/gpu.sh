#!/usr/bin/env bash
# The GPU benchmark in one call (issue 17): on a bare GPU machine, random-weight checkpoints of the real shapes
# (Gemma-2-9b, Gemma-2-27b, Gemma 3 270M; weights change neither speed nor memory) trained by
#   reference        the reference notebook's recipe on HF Trainer
#   toolkit          the toolkit's loop with the model's config
#   toolkit-t4       the same in the T4 profile (fp16, process capped at 15 GiB)
#   trainer-toolkit  HF Trainer given the toolkit's settings (how much of the gain is the settings, how much the loop)
# plus, on the 9B: micro-batch 16 with train.max_tokens_per_micro_batch 1024 in the T4 profile (768 if 1024 runs out
# of memory) and prediction batched vs one row at a time (a fresh random LoRA); on the 27B: the per-device peaks of
# train.parallel=split over 2 x T4 (toolkit-split).
#
# Prepare (here, once, from the project root; needs the package registry and the embedded model's tokenizer):
#   bash tools/gpu_prepare.sh
#     .dev/w        wheels the GPU machine lacks (bitsandbytes, iterative-stratification; ~41 MiB)
#     .dev/dls      tokens.npz: the DLS prompts as Gemma token ids + labels (~0.2 MiB; neither GGUF nor tokenizer
#                   travels, the shapes get a stand-in tokenizer with Gemma's special-token ids)
#   it checks that the project tree + both folders stay well under a call's 64 MiB.
# Expected on an H200 (estimates, nothing measured yet): install 15 s, 9B ~150 s (build ~30 s, ~25 s a recipe),
# budget variant ~30 s, predict ~60 s, 27B split ~160 s (build + load ~30 GB per part), 270M ~60 s.
# Device call (one command, then give the machine back):
#   run(command="bash benchmarks/gpu.sh $OUT", carry=[".dev/w", ".dev/dls"], timeout_s=600)
# Rehearsal on the CPU (tiny shapes, 1 timed step, budgets x4; tests/train/test_gpu_script.py runs it):
#   bash benchmarks/gpu.sh OUT_DIR --smoke
#
# Output in OUT_DIR (3 files): results.jsonl (every figure appended as soon as it is measured, every step's status:
# done / skipped / timeout / error with the reason), gpu.log (all output), summary.md (the table, also printed).
# Each step runs under `timeout` with its own budget, cut to what is left of the whole run's GPU_SH_BUDGET_S
# (default 520 s, so that the call ends inside 9 minutes; --smoke: 1800 s, step budgets x4); a step that cannot get
# its minimum is skipped.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [--smoke]}
SMOKE=0
[ "${2:-}" = "--smoke" ] && SMOKE=1
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu.log
JL=$OUT/results.jsonl
: >"$JL"
: >"$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s)
TOTAL=${GPU_SH_BUDGET_S:-$( ((SMOKE)) && echo 1800 || echo 520)}
RESERVE=15  # for the summary
SCALE=$( ((SMOKE)) && echo 4 || echo 1)  # a shared CPU runs the tiny shapes slower than a GPU the real ones

say() { echo "$*" | tee -a "$LOG"; }
mark() { "$PY" -m benchmarks.gpu_report mark "$JL" "$1" "$2" "$3" >>"$LOG" 2>&1; say "-- $1: $2: $3"; }

# run_step NAME BUDGET_S MIN_S COMMAND...: COMMAND under `timeout`, its output appended to the log, its status marked.
run_step() {
  local name=$1 budget=$(($2 * SCALE)) need=$3
  shift 3
  local left=$((START + TOTAL - RESERVE - $(date +%s)))
  if ((left < need)); then
    mark "$name" skipped "not started: ${left}s left of the ${TOTAL}s budget, it needs ${need}s"
    return 3
  fi
  local limit=$((budget < left ? budget : left)) t0
  t0=$(date +%s)
  say "== $(date -u +%T) step $name (timeout ${limit}s)"
  echo "\$ $*" >>"$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  if ((rc == 124 || rc == 137)); then
    mark "$name" timeout "stopped after ${limit}s; the figures it measured before are kept"
  elif ((rc != 0)); then
    mark "$name" error "exit $rc after $(($(date +%s) - t0))s: $(tail -n 1 "$LOG" | cut -c1-300)"
  else
    mark "$name" done "$(($(date +%s) - t0))s"
  fi
  return $rc
}

if ((SMOKE)); then  # the CPU rehearsal: tiny shapes for the real ones, 1 timed step
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/qlml-gpu-smoke.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  SHAPES_DIR=$WORK/shapes
  TOKENS=$WORK/tokens.npz
  M270=tiny-gemma3 M9=tiny-gemma2 M27=tiny-gemma2
  STEPS=(--steps 1 --warmup 0)
  STEPS_27=(--steps 1 --warmup 0)
  STEPS_270=(--steps 1 --warmup 0)
  # Two "GPUs" small enough that the tiny shape's 4 layers are placed 2 + 2; LoRA from layer 1 so both parts train.
  SPLIT=(--split-gib 0.0348 --set lora.layers_from=1)
  PREDICT=(--rows 16 --batch-size 8 --repeats 1)
  # The 270M's step: the two recipes that read its config (all 7 modules, head LR, micro-batch 16); reference and
  # toolkit-t4 are the same code as the 9B's (rehearsed there): two processes less for the shared CPU.
  PROFILES_270=toolkit,trainer-toolkit
else
  SHAPES_DIR=/tmp/qlml-shapes
  TOKENS=$ROOT/.dev/dls/tokens.npz
  M270=gemma-3-270m M9=gemma-2-9b M27=gemma-2-27b
  STEPS=(--steps 10 --warmup 3)
  STEPS_27=(--steps 6 --warmup 2)
  STEPS_270=(--steps 20 --warmup 3)
  SPLIT=()
  PREDICT=(--rows 256 --batch-size 64 --repeats 3)
  PROFILES_270=reference,toolkit,toolkit-t4,trainer-toolkit
fi
say "gpu.sh $( ((SMOKE)) && echo --smoke) in $ROOT, output in $OUT, budget ${TOTAL}s, $(date -u)"

# -- 1. what the machine lacks: the carried wheels (skipped where bitsandbytes is already importable)
if "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
  mark install done "bitsandbytes already importable; nothing installed"
elif ls "$ROOT"/.dev/w/*.whl >/dev/null 2>&1; then
  run_step install 90 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.dev/w/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
else
  mark install error "no wheels in .dev/w and no bitsandbytes: run bash tools/gpu_prepare.sh here and carry .dev/w"
fi
timeout 60 "$PY" -m benchmarks.gpu_report env "$JL" >>"$LOG" 2>&1 || mark env error "$(tail -n 1 "$LOG" | cut -c1-300)"

if ((SMOKE)); then
  run_step tokens 300 1 "$PY" -m benchmarks.shapes tokens --data data/sample_train.csv --out "$TOKENS"
elif [ ! -f "$TOKENS" ]; then
  mark tokens error "$TOKENS missing: run bash tools/gpu_prepare.sh here and carry .dev/dls"
fi

bench() {  # bench STEP BUDGET MIN MODEL PROFILES [runner args...]
  local step=$1 budget=$2 need=$3 model=$4 profiles=$5
  shift 5
  run_step "$step" "$budget" "$need" "$PY" -m benchmarks.runner --models "$model" --profiles "$profiles" \
    --tokens "$TOKENS" --shapes-dir "$SHAPES_DIR" --timeout "$budget" --jsonl "$JL" --tag "$step" "$@"
}

# -- 2. the 9B: the four recipes, then the T4 profile at micro-batch 16 under a token budget per micro-batch
bench 9b 220 90 "$M9" reference,toolkit,toolkit-t4,trainer-toolkit "${STEPS[@]}"
bench 9b-t4-mb16-tok1024 80 40 "$M9" toolkit-t4 "${STEPS[@]}" \
  --set train.micro_batch_size=16 --set train.max_tokens_per_micro_batch=1024
"$PY" -m benchmarks.gpu_report oom "$JL" 9b-t4-mb16-tok1024
case $? in
  0) bench 9b-t4-mb16-tok768 80 40 "$M9" toolkit-t4 "${STEPS[@]}" \
       --set train.micro_batch_size=16 --set train.max_tokens_per_micro_batch=768 ;;
  1) mark 9b-t4-mb16-tok768 skipped "not needed: micro-batch 16 at 1024 tokens did not run out of memory" ;;
  *) mark 9b-t4-mb16-tok768 skipped "micro-batch 16 at 1024 tokens has no figure nor out-of-memory error" ;;
esac

# -- 3. prediction on the 9B: batched vs one row at a time, a fresh random LoRA of the 9B config on the 9B shape
if [ -f "$SHAPES_DIR/$M9/config.json" ]; then
  run_step predict-9b 100 45 "$PY" -m benchmarks.predict --fresh-lora "$M9" --base "$SHAPES_DIR/$M9" \
    --tokens "$TOKENS" "${PREDICT[@]}" --jsonl "$JL" --tag predict-9b
else
  mark predict-9b skipped "no $M9 shape was built (see the 9b step)"
fi

# -- 4. the 27B split (do its 4-bit parts fit 2 x T4?), then the 270M (cheap) with what time is left
((SMOKE)) || rm -rf "${SHAPES_DIR:?}/$M9"  # disk: the 27B parts are ~30 GB each in bf16
bench 27b-split 240 90 "$M27" toolkit-split "${STEPS_27[@]}" "${SPLIT[@]}"
bench 270m 100 40 "$M270" "$PROFILES_270" "${STEPS_270[@]}"

say "== $(date -u +%T) done in $(($(date +%s) - START))s"
"$PY" -m benchmarks.gpu_report summary "$JL" "$OUT/summary.md" | tee -a "$LOG"
((SMOKE)) || rm -rf "${SHAPES_DIR:?}"
exit 0
