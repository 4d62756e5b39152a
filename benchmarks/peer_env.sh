#!/usr/bin/env bash
# Create the peer-comparison environment: a separate venv with img2dataset (and the peers the
# benchmarks compare against). img2dataset pins an old webdataset, so it must never share the
# project venv. Idempotent: a second run only checks that the imports work.
#
#   bash benchmarks/peer_env.sh            # creates /work/main/.benchvenv (or $BENCHVENV)
#   .benchvenv/bin/python benchmarks/decode_limit.py --impl img2dataset
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCHVENV:-$ROOT/.benchvenv}"
PY="$VENV/bin/python"
STAMP="$VENV/.peers-installed"
export NO_ALBUMENTATIONS_UPDATE=1  # albumentations phones home on import otherwise
# pillow: the generators that make test images run in this env too.
PACKAGES=(img2dataset pillow)

if [ -f "$STAMP" ] && "$PY" -c "import img2dataset.resizer, PIL" 2>/dev/null; then
  echo "peer env ready: $VENV"
  exit 0
fi

test -x "$PY" || python3 -m venv "$VENV"
# Serialise with the project venv's installs: the build machines share a few cores.
flock /tmp/mmcurate-pip.lock "$PY" -m pip install --quiet --upgrade pip
flock /tmp/mmcurate-pip.lock "$PY" -m pip install --quiet "${PACKAGES[@]}"
"$PY" -c "import img2dataset.resizer, PIL"
touch "$STAMP"
echo "peer env ready: $VENV"
