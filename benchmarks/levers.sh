#!/usr/bin/env bash
# Exact-match levers of the embedded 270M (issue 18) and the ensemble-into-one student (issue 16), on the same folds
# of ../shared/data/dls/train.csv, each step paired with the shipped config by python -m benchmarks.levers.
#
#   bash benchmarks/levers.sh [RUNS_DIR] [FOLDS] [STEPS]     # defaults: runs/levers "[0,1]" "base tfidf blend ens dapt2"
#
# Steps (each skipped when its output exists; a cut training step is resumed with --resume):
#   base   the shipped config (configs/gemma-3-270m/qlora.yaml, 2 epochs) on FOLDS, with the score head HEAD
#          (default random: every archived run, measured before model.head_init=descriptions shipped; HEAD=descriptions
#          measures the levers on top of the shipped head)
#   tfidf  python -m train tfidf on base's folds (all 5 folds; its OOF is cut to base's rows for the blend)
#   blend  infer blend of base + tfidf on base's rows (weights tuned, nested estimate)
#   ens    ensemble into one: a 270M student distilled from base + tfidf (weights TEACHER_WEIGHTS, default 2,1)
#          with UNLABELLED_ROWS (default 1000) rows of test.csv for the soft term
#   tfstudent  the TF-IDF student of base (its soft labels, the same unlabelled rows; the cheapest student), reusing
#          the targets ens computed
#   dapt2  DAPT (configs/gemma-3-270m/dapt.yaml, on test.csv) on the trimmed vocabulary, then the shipped config
#   ep3    the shipped config with 3 epochs
#   lora32 / lora64  LoRA r 32, alpha 64 / r 64, alpha 128
#   loraplus  LoRA+: the B matrices at 16x the adapters' lr (train.lora_plus_ratio=16)
#   headlr the head at the adapters' lr (train.head_lr unset; the shipped config gives the head 1e-3)
#   adam8  bitsandbytes' 8-bit AdamW (what train.optimizer=auto picks on a GPU) instead of torch's AdamW
#   headdesc  the score head initialised from the label descriptions (model.head_init=descriptions, issue 38)
#   combo  the winning levers together (issue 38): DAPT at LoRA r 64 (dapt2's corpus and trimmed vocabulary), then
#          r 64 + 3 epochs from it
#   combohd  combo with the score head from the label descriptions (reuses combo's DAPT adapter)
#   combohd_seedN  combohd with train.seed=N on its split (the same DAPT adapter: the seed changes the batches' order
#          and the dropout); the figures add combohd + its seeds averaged
#   posw / focal / asl  class-balanced loss terms: BCE with sqrt(neg/pos) positive weights, focal, asymmetric
#   combohd_posw / combohd_focal / combohd_asl  the same loss terms on top of combohd
#   combohd_ep4  combohd with 4 epochs
#   combohd_ens  ens on top of combohd: combohd's config distilled from combohd + tfidf (run both steps first)
#   combohd_dapt2ep  combohd from a DAPT of 2 epochs (r 64, same corpus) instead of 1
#   combohd_headlr3e-3  combohd with the score head's lr at 3e-3 instead of 1e-3 (train.head_lr)
#   combohd_meanpool  combohd with the head reading the mean of the final hidden states (model.pooling=mean)
#   combohd_16bit  combohd on a bf16 base instead of 4-bit NF4 (quantization.load_in_4bit=false), its DAPT too
#   combohd_cue  combohd with the prompt ending in a cue after the review ("...Review: {text}\n\nTrends:"), so the
#          head reads the same token on every row
#   seedN  the shipped config with train.seed=N on base's split (cv.seed=42); the figures add base + seeds averaged
# Figures: python -m benchmarks.levers RUNS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/levers}
FOLDS=${2:-"[0,1]"}
STEPS=${3:-"base tfidf blend ens dapt2"}
DLS=${DLS:-../shared/data/dls}
UNLABELLED_ROWS=${UNLABELLED_ROWS:-1000}
TEACHER_WEIGHTS=${TEACHER_WEIGHTS:-2,1}
HEAD=${HEAD:-random}
PY=${PYTHON:-python}
CFG=configs/gemma-3-270m/qlora.yaml
DATA=(--set "data.train_csv=$DLS/train.csv" --set "data.label_names_csv=$DLS/trends_description.csv"
      --set "model.head_init=$HEAD")
LOG_NAME=levers.log
source benchmarks/steps.sh
run_cfg() {  # run_cfg NAME [--set ...]: the shipped config on FOLDS with the given overrides
    local name=$1; shift
    log "$name: $*"
    train_or_resume "$R/$name" timed "$name" $PY -m train --config $CFG "${DATA[@]}" --set "cv.folds=$FOLDS" \
        --set "output_dir=$R/$name" "$@"
}
dapt() {  # dapt NAME [--set ...]: the vocabulary trimmed to train + test, then DAPT on test.csv into $R/NAME
    local name=$1; shift
    [ -d "$R/trimmed" ] || { log "trim-vocab"; timed trim $PY -m train trim-vocab --model embedded:gemma-3-270m \
        --corpus "$DLS/train.csv,$DLS/test.csv" --out "$R/trimmed" --config $CFG; }
    [ -f "$R/$name/adapter_model.safetensors" ] && return
    log "$name: dapt on test.csv $*"
    local resume=; [ -d "$R/$name" ] && resume=--resume
    timed "$name" $PY -m train dapt --config configs/gemma-3-270m/dapt.yaml --corpus "$DLS/test.csv" --out "$R/$name" \
        --set "model.name_or_path=$R/trimmed" "$@" --eval-rows 256 $resume
}
unlabelled() {  # the first UNLABELLED_ROWS rows of test.csv, the students' unlabelled rows
    [ -f "$R/unlabelled.csv" ] && return
    $PY -c "import pandas as pd, sys; pd.read_csv(sys.argv[1]).head(int(sys.argv[2])).to_csv(sys.argv[3], index=False)" \
        "$DLS/test.csv" "$UNLABELLED_ROWS" "$R/unlabelled.csv.part" && mv "$R/unlabelled.csv.part" "$R/unlabelled.csv"
}
distill_cfg() {  # distill_cfg NAME TEACHERS [--set ...]: the shipped config on FOLDS distilled from TEACHERS
    local name=$1 teachers=$2; shift 2             # (weights TEACHER_WEIGHTS) with the unlabelled rows
    unlabelled
    log "$name: distill from $teachers ($TEACHER_WEIGHTS), $UNLABELLED_ROWS unlabelled rows $*"
    train_or_resume "$R/$name" timed "$name" $PY -m train distill --config $CFG "${DATA[@]}" --set "cv.folds=$FOLDS" \
        --set "output_dir=$R/$name" "$@" --teacher "$teachers" --teacher-weights "$TEACHER_WEIGHTS" \
        --unlabelled "$R/unlabelled.csv"
}
R64=(--set lora.r=64 --set lora.alpha=128)
COMBO=(--set "model.name_or_path=$R/trimmed" --set "lora.init_adapter=$R/dapt64" "${R64[@]}" --set train.num_epochs=3)
COMBOHD=("${COMBO[@]}" --set model.head_init=descriptions)
combohd_cfg() {  # combohd_cfg NAME [--set ...]: combohd (DAPT r 64 first) with the given overrides on top
    local name=$1; shift
    dapt dapt64 "${R64[@]}"
    run_cfg "$name" "${COMBOHD[@]}" "$@"
}
declare -A LOSS=([posw]=loss.pos_weight=sqrt [focal]=loss.name=focal [asl]=loss.name=asymmetric)

for step in $STEPS; do
    case $step in
    base) run_cfg base ;;
    tfidf)  # on the split of base (or combohd: the same cv.seed), cut to base's rows where base ran
        folds=; for f in "$R/base/folds.csv" "$R/combohd/folds.csv"; do [ -n "$folds" ] || [ ! -f "$f" ] || folds=$f; done
        [ -n "$folds" ] || { echo "tfidf: run the base or combohd step first (its folds.csv)" >&2; exit 2; }
        [ -d "$R/tfidf" ] || { log "tfidf"; timed tfidf $PY -m train tfidf --config $CFG "${DATA[@]}" \
            --folds "$folds" --out "$R/tfidf"; }
        if [ -f "$R/base/oof.csv" ]; then
            $PY -m benchmarks.levers subset "$R/tfidf/oof.csv" "$R/base/oof.csv" "$R/tfidf_base_rows.csv"
        fi ;;
    blend)
        [ -f "$R/blend_oof.csv" ] || { log "blend"; timed blend $PY -m infer blend \
            --oof "$R/base/oof.csv,$R/tfidf_base_rows.csv" --labels "$DLS/train.csv" --folds "$R/base/folds.csv" \
            --out-oof "$R/blend_oof.csv" --no-progress; } ;;
    ens)
        distill_cfg ens "$R/base,$R/tfidf" ;;
    tfstudent)
        [ -d "$R/tfstudent" ] || { log "tfstudent: tfidf distilled from base"; timed tfstudent $PY -m train tfidf \
            --config $CFG "${DATA[@]}" --set "cv.folds=$FOLDS" --folds "$R/base/folds.csv" --teacher "$R/base" \
            --unlabelled "$R/unlabelled.csv" --targets-from "$R/ens/teachers" --out "$R/tfstudent"; } ;;
    dapt2)
        dapt dapt
        run_cfg dapt2 --set "model.name_or_path=$R/trimmed" --set "lora.init_adapter=$R/dapt" ;;
    ep3) run_cfg ep3 --set train.num_epochs=3 ;;
    lora32) run_cfg lora32 --set lora.r=32 --set lora.alpha=64 ;;
    lora64) run_cfg lora64 --set lora.r=64 --set lora.alpha=128 ;;
    loraplus) run_cfg loraplus --set train.lora_plus_ratio=16 ;;
    headlr) run_cfg headlr --set train.head_lr=null ;;
    adam8) run_cfg adam8 --set train.optimizer=adamw_8bit ;;
    headdesc) run_cfg headdesc --set model.head_init=descriptions ;;
    combo) dapt dapt64 "${R64[@]}"; run_cfg combo "${COMBO[@]}" ;;
    combohd | combohd_seed[0-9]*)
        seed=(); [ "$step" = combohd ] || seed=(--set "train.seed=${step#combohd_seed}" --set cv.seed=42)
        combohd_cfg "$step" "${seed[@]}" ;;
    posw | focal | asl) run_cfg "$step" --set "${LOSS[$step]}" ;;
    combohd_posw | combohd_focal | combohd_asl) combohd_cfg "$step" --set "${LOSS[${step#combohd_}]}" ;;
    combohd_ep4) combohd_cfg "$step" --set train.num_epochs=4 ;;
    combohd_dapt2ep)  # its own DAPT adapter replaces dapt64 (the later --set wins)
        dapt dapt64_2ep "${R64[@]}" --set train.num_epochs=2
        run_cfg "$step" "${COMBOHD[@]}" --set "lora.init_adapter=$R/dapt64_2ep" ;;
    combohd_headlr3e-3) combohd_cfg "$step" --set train.head_lr=3.0e-3 ;;
    combohd_meanpool) combohd_cfg "$step" --set model.pooling=mean ;;
    combohd_cue) combohd_cfg "$step" --set 'data.text_template="user assesment: {assessment}\n\nTags: {tags}\n\nReview: {text}\n\nTrends:"' ;;
    combohd_16bit)  # its own DAPT adapter on the same 16-bit base replaces dapt64 (the later --set wins)
        dapt dapt64_16bit "${R64[@]}" --set quantization.load_in_4bit=false
        run_cfg "$step" "${COMBOHD[@]}" --set "lora.init_adapter=$R/dapt64_16bit" --set quantization.load_in_4bit=false ;;
    combohd_ens)
        [ -f "$R/combohd/summary.json" ] || { echo "combohd_ens: run the combohd step first (the teacher)" >&2; exit 2; }
        [ -d "$R/tfidf" ] || { echo "combohd_ens: run the tfidf step first (the second teacher)" >&2; exit 2; }
        dapt dapt64 "${R64[@]}"
        distill_cfg combohd_ens "$R/combohd,$R/tfidf" "${COMBOHD[@]}" ;;
    seed[0-9]*) run_cfg "$step" --set "train.seed=${step#seed}" --set cv.seed=42 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
log "finished: $STEPS"
