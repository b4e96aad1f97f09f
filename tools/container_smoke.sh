#!/usr/bin/env bash
# Build the service image (Containerfile) and smoke-test it on a machine without registry access (as root):
#   1. base image: `debootstrap --variant=minbase bookworm` with python3 / venv / pip from Debian's packages,
#      imported with `podman import` (no registry needed);
#   2. build: `buildah bud --isolation chroot --build-arg BASE=...` (pip gets this machine's CA bundle, and torch the
#      local wheel folder $TORCH_WHEELS if set);
#   3. `podman run` is not possible here (crun's setrlimit is denied), so the image's filesystem is mounted
#      (`podman image mount`) and its ENTRYPOINT started with `chroot` as the image's non-root user, the adapter
#      folder bind-mounted on the /adapters volume; then GET /health, /ready (start-up time), POST /predict, and the
#      image's HEALTHCHECK command.
# The steps are those of ../shared/containers.md. Users elsewhere build the same file with `docker build -f
# Containerfile .` and the default BASE (docs/serving.md#container).
#
# Usage: tools/container_smoke.sh [ADAPTER [BASE_MODEL]]
#   ADAPTER defaults to adapters/gemma-3-270m if present, else a tiny run trained here (tiny random-init Gemma-3,
#   2 steps, as tests/infer/test_predict.py does; needs the repo's .venv) whose base model is passed as --base-model.
# Environment: IMAGE (default localhost/qlml-serve:smoke), WORK (default /tmp/qlml-container-smoke), PORT (8000: the
#   port the HEALTHCHECK probes), TORCH_WHEELS (a folder holding the torch wheel; default /opt/wheels if it exists),
#   REBUILD_BASE=1 to redo the debootstrap base, REBUILD=0 to reuse an existing $IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
IMAGE=${IMAGE:-localhost/qlml-serve:smoke}
BASE_IMAGE=localhost/localbase:bookworm
WORK=${WORK:-/tmp/qlml-container-smoke}
PORT=${PORT:-8000}
TORCH_WHEELS=${TORCH_WHEELS:-$([ -d /opt/wheels ] && echo /opt/wheels || true)}
mkdir -p "$WORK"
say() { printf '[smoke %s] %s\n' "$(date +%T)" "$*"; }

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, buildah, mount, chroot)" >&2; exit 2; }
for tool in podman buildah debootstrap curl; do
  command -v "$tool" >/dev/null || { say "apt-get install $tool"; apt-get install -y podman buildah debootstrap curl; }
done
if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/health"; then
  echo "port $PORT is in use: set PORT" >&2; exit 2
fi

# 1. The base image -----------------------------------------------------------------------------------------------
if [ "${REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
  MIRROR=$({ grep -hoE '^(URIs:|deb) +http[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
             || true; } | grep -v security | awk '{print $2; exit}')
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  say "debootstrap minbase bookworm from $MIRROR"
  rm -rf "$WORK/rootfs"
  t0=$(date +%s)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE_IMAGE" >"$WORK/import.log" 2>&1
  rm -rf "$WORK/rootfs"
  say "base image $BASE_IMAGE in $(( $(date +%s) - t0 )) s"
fi

# 2. Build ------------------------------------------------------------------------------------------------------------
build_args=(--build-arg "BASE=$BASE_IMAGE")
volumes=()
if [ -n "${PIP_CERT:-}" ]; then  # not at its own path: that breaks the ca-certificates package inside the build
  volumes+=(--volume "$PIP_CERT:/run/host-ca.pem:ro"); build_args+=(--build-arg PIP_CA=/run/host-ca.pem)
fi
if [ -n "$TORCH_WHEELS" ]; then  # e.g. when download.pytorch.org cannot be reached: the CPU wheel from a folder
  volumes+=(--volume "$TORCH_WHEELS:/run/wheels:ro")
  build_args+=(--build-arg WHEELS=/run/wheels --build-arg TORCH_INDEX=)
  cpu_wheel=$(ls "$TORCH_WHEELS" | grep -oE '^torch-[^-]+\+cpu' | head -1 | sed 's/^torch-/torch==/' || true)
  [ -n "$cpu_wheel" ] && build_args+=(--build-arg "TORCH=$cpu_wheel")
fi
if [ "${REBUILD:-1}" = 0 ] && podman image exists "$IMAGE"; then
  say "REBUILD=0: reusing $IMAGE"
else
  say "buildah bud --isolation chroot ${build_args[*]}"
  t0=$(date +%s)
  buildah bud --isolation chroot --format docker --layers=false -f Containerfile "${volumes[@]}" "${build_args[@]}" \
    -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
  say "built in $(( $(date +%s) - t0 )) s"
fi
say "$IMAGE: size $(podman image inspect --format '{{.Size}}' "$IMAGE" \
  | awk '{printf "%.0f MB", $1/1e6}') (base $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" \
  | awk '{printf "%.0f MB", $1/1e6}'))"

# 3. The adapter --------------------------------------------------------------------------------------------------
ADAPTER=${1:-}
BASE_MODEL=${2:-}
mkdir -p "$WORK/adapters"
if [ -z "$ADAPTER" ] && [ -d adapters/gemma-3-270m ]; then ADAPTER=adapters/gemma-3-270m; fi
if [ -z "$ADAPTER" ]; then
  if [ ! -d "$WORK/adapters/run" ]; then
    say "training a tiny run (tiny random-init Gemma-3, 2 steps) with .venv"
    rm -rf "$WORK/tiny"
    (cd "$WORK" && PYTHONPATH="$REPO:$REPO/tests:$REPO/tests/infer" "$REPO/.venv/bin/python" - "$WORK/tiny" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

from conftest import SAMPLE_TRAIN, build_tiny_model
from test_predict import train_tiny_run

root = Path(sys.argv[1])
model = build_tiny_model("gemma3", root / "tiny-model")
pd.read_csv(SAMPLE_TRAIN).head(60).to_csv(root / "train60.csv", index=False)
train_tiny_run(root, model, root / "train60.csv", folds=(0,))
EOF
    ) >"$WORK/tiny.log" 2>&1 || { tail -30 "$WORK/tiny.log"; exit 1; }
    cp -r "$WORK/tiny/tiny-model" "$WORK/adapters/tiny-model"
    cp -r "$WORK/tiny/run" "$WORK/adapters/run"
  fi
  ADAPTER_IN=/adapters/run
  BASE_MODEL_IN=/adapters/tiny-model
else
  rm -rf "$WORK/adapters/given"; cp -r "$ADAPTER" "$WORK/adapters/given"
  ADAPTER_IN=/adapters/given
  BASE_MODEL_IN=
  if [ -n "$BASE_MODEL" ]; then cp -r "$BASE_MODEL" "$WORK/adapters/base-model"; BASE_MODEL_IN=/adapters/base-model; fi
fi

# The image runs as a non-root user: the mounted files must be readable by it (the safetensors files a run writes are
# owner-only; with Docker: chmod -R a+rX adapters/ or run with --user "$(id -u)").
chmod -R a+rX "$WORK/adapters"

# 4. Start the image's entrypoint in its mounted filesystem -----------------------------------------------------------
MNT=$(podman image mount "$IMAGE")
SERVER_PID=
mounted=()
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  for ((i=${#mounted[@]}-1; i>=0; i--)); do
    umount "${mounted[$i]}" 2>/dev/null || umount -l "${mounted[$i]}" || true
  done
  podman image unmount "$IMAGE" >/dev/null || true
}
trap cleanup EXIT
bind() { mount --bind "$1" "$MNT$2"; mounted+=("$MNT$2"); }
bind "$WORK/adapters" /adapters
bind /dev /dev
mount -t proc proc "$MNT/proc"; mounted+=("$MNT/proc")
for d in /tmp /home/qlml/.cache /dev/shm; do mount -t tmpfs -o mode=1777 tmpfs "$MNT$d"; mounted+=("$MNT$d"); done
mkdir -p "$MNT/home/qlml/.cache"

inspect() { podman image inspect --format "$1" "$IMAGE"; }
mapfile -t ENVS < <(inspect '{{range .Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
json_lines() { python3 -c 'import json, sys; print(*json.load(sys.stdin)[int(sys.argv[1]):], sep="\n")' "$1"; }
mapfile -t ENTRY < <(inspect '{{json .Config.Entrypoint}}' | json_lines 0)
mapfile -t HEALTH < <(inspect '{{json .Config.Healthcheck.Test}}' | json_lines 1)  # after "CMD"
USER_NAME=$(inspect '{{.Config.User}}')
IDS=$(awk -F: -v u="$USER_NAME" '$1 == u {print $3 ":" $4}' "$MNT/etc/passwd")
WORKDIR=$(inspect '{{.Config.WorkingDir}}')
args=(--adapter "$ADAPTER_IN" --port "$PORT")
[ -n "$BASE_MODEL_IN" ] && args+=(--base-model "$BASE_MODEL_IN")
say "chroot as $USER_NAME ($IDS): ${ENTRY[*]} ${args[*]}"
t0=$(date +%s.%N)
chroot --userspec="$IDS" "$MNT" /usr/bin/env -i "${ENVS[@]}" HOME="/home/$USER_NAME" \
  sh -c 'cd "$0" && exec "$@"' "$WORKDIR" "${ENTRY[@]}" "${args[@]}" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)"; }
until curl -sf -o /dev/null "http://127.0.0.1:$PORT/health"; do
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "server died" >&2; exit 1; }; sleep 0.2
done
say "/health 200 after $(since) s"
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ready")" = 200 ]; do
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "server died" >&2; exit 1; }; sleep 0.5
done
say "/ready 200 after $(since) s (start-up: process start, model load, warm-up batch)"
if [ "$PORT" = 8000 ]; then
  chroot --userspec="$IDS" "$MNT" /usr/bin/env -i "${ENVS[@]}" "${HEALTH[@]}" && say "HEALTHCHECK command: ok"
fi
body='{"rows": [{"assessment": 4.0, "tags": ["DELIVERY"], "text": "Курьер опоздал на час, нет нормальных скидок"}]}'
say "POST /predict $body"
curl -sS --fail-with-body -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:$PORT/predict"; echo
say "server log (last lines):"; tail -5 "$WORK/server.log"
say "ok"
