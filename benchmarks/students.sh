#!/usr/bin/env bash
# Production students (issue 16): the embedded 270M (shipped config, 2 epochs) as teacher; students on its trimmed
# vocabulary pruned to 12, 9 and 6 of 18 layers, distilled from it on the same folds; then CPU prediction speed.
#
#   bash benchmarks/students.sh [RUNS_DIR] [FOLDS] [LAYERS]      # defaults: runs/students "[0]" "9 6 12"
#
# LAYERS: N (keep N decoder layers) or N:F (and keep the fraction F of the MLP channels, train prune --mlp-keep F;
# the student's folder is studentN_mlpF). TEACHER=RUN uses a finished CV run of the shipped config on the same split
# (e.g. runs/levers/base, which has every fold) instead of training RUNS_DIR/teacher; it is linked there.
# PREDICT=0 stops after the students' training (e.g. on a GPU, where CPU speed is not measured).
# Every step is skipped when its output exists, so running it again after a cut goes on where it stopped (a
# training step that was cut is resumed with --resume). Figures: python -m benchmarks.students RUNS_DIR.
# The teacher's fold-k probabilities on the students' training rows are computed by the first student's distill
# run and copied to the others (same teacher, same rows: the files are checked by row id when read).
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/students}
FOLDS=${2:-"[0]"}
LAYERS=${3:-"9 6 12"}
DLS=${DLS:-../shared/data/dls}
UNLABELLED_ROWS=${UNLABELLED_ROWS:-1000}
PY=${PYTHON:-python}
CFG=configs/gemma-3-270m/qlora.yaml
# model.head_init=random: the archived students and teacher were measured before the head from descriptions shipped
DATA=(--set "data.train_csv=$DLS/train.csv" --set "data.label_names_csv=$DLS/trends_description.csv"
      --set "cv.folds=$FOLDS" --set model.head_init=random)
LOG_NAME=students.log
source benchmarks/steps.sh

if [ ! -f "$R/unlabelled.csv" ]; then
    $PY -c "import pandas as pd, sys; pd.read_csv(sys.argv[1]).head(int(sys.argv[2])).to_csv(sys.argv[3], index=False)" \
        "$DLS/test.csv" "$UNLABELLED_ROWS" "$R/unlabelled.csv.part" && mv "$R/unlabelled.csv.part" "$R/unlabelled.csv"
fi

if [ -n "${TEACHER:-}" ]; then
    [ -e "$R/teacher" ] || ln -s "$(realpath "$TEACHER")" "$R/teacher"
    log "teacher: $TEACHER (linked as $R/teacher)"
else
    log "teacher: $CFG, folds $FOLDS"
    train_or_resume "$R/teacher" timed teacher $PY -m train --config $CFG "${DATA[@]}" --set "output_dir=$R/teacher"
fi

[ -d "$R/trimmed" ] || timed trim $PY -m train trim-vocab --model embedded:gemma-3-270m \
    --corpus "$DLS/train.csv,$DLS/test.csv" --out "$R/trimmed" --config $CFG

first=""
names=""
for spec in $LAYERS; do
    n=${spec%%:*}; mlp=()
    name=$n
    if [ "$spec" != "$n" ]; then mlp=(--mlp-keep "${spec#*:}"); name="${n}_mlp${spec#*:}"; fi
    names="$names student$name"
    [ -d "$R/pruned$name" ] || timed "prune$name" $PY -m train prune --model "$R/trimmed" --keep-layers "$n" \
        "${mlp[@]}" --data "$DLS/train.csv" --out "$R/pruned$name" --config $CFG
    s="$R/student$name"
    if [ -n "$first" ] && [ ! -d "$s" ] && [ -d "$first/teachers" ]; then
        mkdir -p "$s" && cp -r "$first/teachers" "$s/teachers"
    fi
    log "student $spec"
    train_or_resume "$s" timed "student$name" $PY -m train distill --config $CFG "${DATA[@]}" \
        --set "model.name_or_path=$R/pruned$name" --set "output_dir=$s" --teacher "$R/teacher" \
        --unlabelled "$R/unlabelled.csv"
    first=${first:-$s}
done

[ "${PREDICT:-1}" = 1 ] || { log "PREDICT=0: no prediction timings"; exit 0; }
# CPU prediction: the same 512 test rows through infer predict, one process per model (load + predict timed by
# infer predict itself; peak RSS by /usr/bin/time).
$PY -c "import pandas as pd, sys; pd.read_csv(sys.argv[1]).iloc[-512:].to_csv(sys.argv[2], index=False)" \
    "$DLS/test.csv" "$R/predict_rows.csv"
for m in teacher $names; do
    [ -f "$R/predict_$m.csv" ] && continue
    log "predict $m"
    timed "predict_$m" $PY -m infer predict --adapter "$R/$m" --input "$R/predict_rows.csv" \
        --out "$R/predict_$m.csv" --no-progress
done
$PY -m benchmarks.students "$R"
