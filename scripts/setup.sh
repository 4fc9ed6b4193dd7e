#!/usr/bin/env bash
# Idempotent set-up: a venv with the pinned torch/transformers/ROS 2 wheels of one distribution
# (scripts/distro.sh: Jazzy by default in .venv, Kilted with QVL_ROS_DISTRO=kilted in
# .venv-kilted), the venv made into a usable ROS prefix, then `colcon build` of this package.
#
# The ROS 2 packages that no registry serves (launch, launch_ros, launch_pytest, the ros2
# command, message_filters, vision_msgs, composition_interfaces) come from, in this order:
#   1. a sourced ROS 2 install that has them (its Python modules and AMENT_PREFIX_PATH);
#   2. the folder $QVL_ROS2_EXTRA (default ../shared/ros2-extra): its wheels are installed into
#      the venv and its message sources built with colcon into the same install tree;
#   3. neither: the demo runs without them and their tests skip with the reason. With CI=true a
#      missing one is an error, so nothing silently stops being tested.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QVL_ROOT=$ROOT
# shellcheck source=scripts/distro.sh
. "$ROOT/scripts/distro.sh"
VENV=$QVL_VENV
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

EXTRA_MODULES=(launch launch_ros launch_pytest ros2cli ros2launch message_filters)
EXTRA_MESSAGES=(composition_interfaces vision_msgs)

# Python modules of the extra set that a sourced ROS 2 install (not this venv) already provides.
system_has_modules() {
  [ -n "${PYTHONPATH:-}" ] || return 1
  PYTHONPATH=$PYTHONPATH "$PY" - "${EXTRA_MODULES[@]}" <<'PYEOF' >/dev/null 2>&1
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)
PYEOF
}
# A message package that a prefix on AMENT_PREFIX_PATH, other than this venv and this
# checkout's install tree, already provides.
system_has_package() {
  local prefix
  IFS=: read -r -a prefixes <<< "${AMENT_PREFIX_PATH:-}"
  for prefix in "${prefixes[@]}"; do
    case "$prefix" in "$VENV"|"$QVL_INSTALL"/*|"") continue ;; esac
    [ -f "$prefix/share/$1/package.xml" ] && return 0
  done
  return 1
}

extra_wheels=()
extra_sources=()
missing=()
if system_has_modules; then
  echo "[setup] ${EXTRA_MODULES[*]}: from the sourced ROS 2 install"
elif [ -d "$QVL_ROS2_EXTRA/wheels" ]; then
  mapfile -t extra_wheels < <(find "$QVL_ROS2_EXTRA/wheels" -maxdepth 1 -name '*.whl' | LC_ALL=C sort)
fi
if ! system_has_modules && [ "${#extra_wheels[@]}" -eq 0 ]; then
  missing+=("${EXTRA_MODULES[@]}")
fi
for pkg in "${EXTRA_MESSAGES[@]}"; do
  if system_has_package "$pkg"; then
    echo "[setup] $pkg: from the sourced ROS 2 install"
  elif [ -f "$QVL_ROS2_EXTRA/src/$pkg/package.xml" ]; then
    extra_sources+=("$QVL_ROS2_EXTRA/src/$pkg")
  else
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  msg="${missing[*]}: neither in a sourced ROS 2 install nor in $QVL_ROS2_EXTRA"
  if [ "${CI:-}" = "true" ]; then
    echo "[setup] ERROR (CI=true, nothing may silently stop being tested): $msg" >&2
    exit 1
  fi
  echo "[setup] note: $msg; the tests that need them will be skipped (pytest -rs names them)"
fi

stamp=$VENV/.qvl_setup_done
req=$QVL_REQUIREMENTS
want=$( { sha256sum "$req" "$ROOT/setup.py" "$0" "$ROOT/scripts/distro.sh"
          for w in "${extra_wheels[@]}"; do echo "$(basename "$w") $(stat -c %s "$w")"; done; } \
        | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV (ROS 2 $QVL_ROS_DISTRO)"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned packages of $(basename "$req") (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade "pip<27" "setuptools<80" wheel
  "$VENV/bin/python" -m pip install -q -r "$req"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  if [ "${#extra_wheels[@]}" -gt 0 ]; then
    echo "[setup] installing ${#extra_wheels[@]} wheels of $QVL_ROS2_EXTRA"
    "$VENV/bin/python" -m pip install -q --no-deps "${extra_wheels[@]}"
  fi
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
# the install tree, so edits to the sources never need a rebuild.
cmake_args=(-DPython3_EXECUTABLE="$VENV/bin/python" -DQVL_INSTALL_PYTHON_SOURCES=OFF -DBUILD_TESTING=OFF)

# colcon_build NAME STAMP_KEY PATH...: build the packages at PATH... into $QVL_INSTALL unless the
# stamp says this exact input was built there already.
colcon_build() {
  local name=$1 key=$2
  shift 2
  local stamp_file=$QVL_BUILD/.qvl_colcon_stamp_$name
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$key" ] && [ -f "$QVL_INSTALL/setup.sh" ]; then
    return 0
  fi
  echo "[setup] colcon build ($name)"
  rm -f "$stamp_file"
  mkdir -p "$QVL_BUILD"
  local build_log=$QVL_BUILD/colcon_build_$name.log t0
  t0=$(date +%s)
  if ! (cd "$ROOT" && \
        AMENT_PREFIX_PATH=$extra_prefixes$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH} \
        CMAKE_PREFIX_PATH=$extra_prefixes$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH} \
        colcon --log-base "$QVL_LOG" build --paths "$@" \
          --build-base "$QVL_BUILD" --install-base "$QVL_INSTALL" \
          --event-handlers console_cohesion+ status- summary- \
          --cmake-args "${cmake_args[@]}" \
        ) >"$build_log" 2>&1; then
    echo "[setup] ERROR: colcon build ($name) failed; last lines of $build_log:" >&2
    tail -n 60 "$build_log" >&2
    exit 1
  fi
  echo "$key" > "$stamp_file"
  echo "[setup] colcon build ($name) done in $(( $(date +%s) - t0 )) s"
}

# sources_key DIR...: a digest of the files of the given source folders, the build options and
# the venv (its identity and ROS distribution).
sources_key() {
  {
    echo "${cmake_args[*]}"
    for d in "$@"; do find "$d" -type f ! -name '*.pyc' ! -path '*/__pycache__/*'; done \
      | LC_ALL=C sort | xargs -r sha256sum
    sha256sum "$VENV/pyvenv.cfg" "$QVL_REQUIREMENTS"
  } | sha256sum | cut -c1-16
}

# The extra message packages first: the Detect action of this package needs vision_msgs.
extra_key=none
extra_prefixes=
if [ "${#extra_sources[@]}" -gt 0 ]; then
  extra_key=$(sources_key "${extra_sources[@]}")
  for src in "${extra_sources[@]}"; do
    [ -d "$QVL_INSTALL/$(basename "$src")" ] || rm -f "$QVL_BUILD/.qvl_colcon_stamp_extra"
  done
  colcon_build extra "$extra_key" "${extra_sources[@]}"
fi

own_inputs=()
for d in msg srv action launch config CMakeLists.txt package.xml; do
  [ -e "$ROOT/$d" ] && own_inputs+=("$ROOT/$d")
done
own_key=$( { sources_key "${own_inputs[@]}"; echo "extra $extra_key"; } | sha256sum | cut -c1-16)
for src in "${extra_sources[@]}"; do
  extra_prefixes+="$QVL_INSTALL/$(basename "$src"):"
done
[ -d "$QVL_INSTALL/qvl_ros" ] || rm -f "$QVL_BUILD/.qvl_colcon_stamp_messages"
colcon_build messages "$own_key" "$ROOT"
