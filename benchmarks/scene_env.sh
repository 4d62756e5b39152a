#!/usr/bin/env bash
# Create the PySceneDetect environment for benchmarks/scenes.py: a separate venv with scenedetect
# and OpenCV (never the project venv: OpenCV brings its own FFmpeg). Idempotent: a second run
# only checks that the CLI works.
#
#   bash benchmarks/scene_env.sh           # creates /work/main/.scenevenv (or $SCENEVENV)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SCENEVENV:-$ROOT/.scenevenv}"
PY="$VENV/bin/python"
STAMP="$VENV/.scenedetect-installed"

if [ -f "$STAMP" ] && "$VENV/bin/scenedetect" version >/dev/null 2>&1; then
  echo "scene env ready: $VENV"
  exit 0
fi

test -x "$PY" || python3 -m venv "$VENV"
# Serialise with the project venv's installs: the build machines share a few cores.
flock /tmp/mmcurate-pip.lock "$PY" -m pip install --quiet --upgrade pip
flock /tmp/mmcurate-pip.lock "$PY" -m pip install --quiet "scenedetect==0.7.2" opencv-python-headless
"$VENV/bin/scenedetect" version
touch "$STAMP"
echo "scene env ready: $VENV"
