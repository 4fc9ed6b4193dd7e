#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with pinned torch/transformers/ROS 2 Kilted wheels,
# the venv made into a usable ROS prefix, then `colcon build` of this package.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$ROOT/.venv
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

stamp=$VENV/.qvl_setup_done
req=$ROOT/scripts/requirements.txt
want=$(sha256sum "$req" "$0" | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned packages (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade "pip<27" setuptools wheel
  "$VENV/bin/python" -m pip install -q -r "$req"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi
