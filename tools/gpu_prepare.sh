#!/usr/bin/env bash
# Stage, here, what `bash benchmarks/gpu.sh` needs on a bare GPU machine, under .dev/ (ignored by git), to be carried:
#   .dev/w    wheels for Python 3.12 / x86_64 that the GPU machine lacks: bitsandbytes, iterative-stratification
#             (the pins of ../shared/device/prepare.sh, without optuna: the benchmarks don't tune; that script does
#             the same but stops in a git worktree, where .git is a file)
#   .dev/dls  tokens.npz: the DLS prompts (../shared/data/dls/train.csv) as Gemma token ids + labels, tokenised
#             with the embedded model's tokenizer: the data stays out of the repo, and no tokenizer travels
# Then checks that the project tree and both folders stay well under a call's 64 MiB (limit used: 56 MiB).
# Usage (from the project root, with the project's Python): PYTHON=.venv/bin/python bash tools/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p .dev/w .dev/dls
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .dev/w \
  bitsandbytes==0.50.2 iterative-stratification
"$PY" -m benchmarks.shapes tokens --data "${DLS_CSV:-../shared/data/dls/train.csv}" --out .dev/dls/tokens.npz
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null) | wc -c)
dev=$(cat .dev/w/* .dev/dls/* | wc -c)
total=$(((tree + dev) / 1048576))
echo "carried: project tree $((tree / 1024)) KiB + .dev/w + .dev/dls $((dev / 1024)) KiB = ${total} MiB (limit 64 MiB)"
if ((total >= 56)); then
  echo "error: ${total} MiB is too close to the 64 MiB a call carries; remove extra wheels from .dev/w" >&2
  exit 1
fi
