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
want=$(sha256sum "$req" "$ROOT/setup.py" "$0" | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned packages (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade "pip<27" "setuptools<80" wheel
  "$VENV/bin/python" -m pip install -q -r "$req"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi

# --- ROS 2: the venv as a ROS prefix, then `colcon build` of the messages ---------------------
export PATH=$VENV/bin:$PATH

# Some exported CMake targets in the ROS wheels name include dirs of the machine the wheels were
# built on (/opt/python/cp311-cp311/...). Point them at this venv's Python and numpy headers.
# Only files inside the venv are touched; nothing is created outside the project.
mapfile -t stale_cmake < <(grep -l '/opt/python/cp3' "$VENV"/share/*/cmake/*.cmake 2>/dev/null || true)
if [ "${#stale_cmake[@]}" -gt 0 ]; then
  py_inc=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  np_inc=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
  if [ ! -f "$py_inc/Python.h" ]; then
    echo "[setup] ERROR: Python headers not found in $py_inc (install the python3.11 dev headers)" >&2
    exit 1
  fi
  echo "[setup] fixing include paths in ${#stale_cmake[@]} CMake files of the ROS wheels"
  sed -i -E \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/(_core|core)/include#${np_inc}#g" \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${py_inc}#g" \
    "${stale_cmake[@]}"
  if grep -l '/opt/python/cp3' "${stale_cmake[@]}" >/dev/null; then
    echo "[setup] WARNING: unrecognised /opt/python paths remain in:" >&2
    grep -l '/opt/python/cp3' "${stale_cmake[@]}" >&2
  fi
fi

# Build the messages unless their inputs are unchanged since the last successful build.
# The Python sources are not installed (QVL_INSTALL_PYTHON_SOURCES=OFF): scripts/run.sh puts the
# source tree first on PYTHONPATH and qvl_ros/__init__.py finds the generated qvl_ros.msg in
# install/, so edits to the sources never need a rebuild.
build_stamp=$ROOT/build/.qvl_colcon_stamp
cmake_args=(-DPython3_EXECUTABLE="$VENV/bin/python" -DQVL_INSTALL_PYTHON_SOURCES=OFF)
build_want=$(cd "$ROOT" && {
  echo "${cmake_args[*]}"
  for d in msg srv launch config; do
    if [ -d "$d" ]; then find "$d" -type f ! -name '*.pyc'; fi
  done | LC_ALL=C sort | xargs -r sha256sum
  sha256sum CMakeLists.txt package.xml
  sha256sum "$VENV/pyvenv.cfg"
} | sha256sum | cut -c1-16)
if [ -f "$build_stamp" ] && [ "$(cat "$build_stamp")" = "$build_want" ] \
    && [ -f "$ROOT/install/setup.sh" ] && [ -d "$ROOT/install/qvl_ros" ]; then
  :
else
  echo "[setup] colcon build (messages)"
  rm -f "$build_stamp"
  mkdir -p "$ROOT/build"
  build_log=$ROOT/build/colcon_build.log
  t0=$(date +%s)
  if ! (cd "$ROOT" && \
        AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV \
        colcon build --paths . --event-handlers console_cohesion+ status- summary- \
          --cmake-args "${cmake_args[@]}" \
        ) >"$build_log" 2>&1; then
    echo "[setup] ERROR: colcon build failed; last lines of $build_log:" >&2
    tail -n 60 "$build_log" >&2
    exit 1
  fi
  echo "$build_want" > "$build_stamp"
  echo "[setup] colcon build done in $(( $(date +%s) - t0 )) s"
fi
