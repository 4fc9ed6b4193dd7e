#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine with its own Python, torch and transformers and
# no network: no venv, no ROS, nothing downloaded. Made to fit one 10-minute command.
#
#   OUT=/some/dir scripts/gpu_check.sh [transformers-*.whl]
#
# Stages, in order, each with its own time limit (seconds; environment variables override them),
# each writing under $OUT as it goes, so that a stage cut short keeps what the earlier ones and its
# own finished parts produced:
#   1-env         (LIMIT_ENV=60)     Python, torch, transformers, huggingface-hub, pytest, devices
#   2-cuda-tests  (LIMIT_TESTS=150)  the CUDA tests of test/test_cuda.py and test/test_quant.py,
#                                    one line per test as it finishes
#   3-bench-quick (LIMIT_QUICK=270)  bench/gpu.py --quick: its JSON holds every finished row
#   4-bench-full  (what is left of GPU_CHECK_BUDGET=570, if at least 90)  bench/gpu.py
# After every stage $OUT/summary.txt and $OUT/summary.json say, per stage: ok, failed (exit
# status), timed out, or skipped (no CUDA: the CUDA stages say so and the check moves on), its
# seconds and its limit. Exit status: 0 when no stage failed or timed out, else 1.
#
# Carried wheels (no network there): every *.whl in $WHEELS (default shared/wheels), plus a
# transformers wheel given as the argument (or $TRANSFORMERS_WHEEL). pytest and its dependencies
# (pytest, pluggy, iniconfig, packaging, pygments) go to one directory, used where the machine has no pytest;
# everything else (transformers 5.23 and the huggingface-hub >= 1.31 it needs at import, ...) to
# another, put first on PYTHONPATH only if transformers then imports, else the installed one is
# used and 1-env.txt says why. Wheels are installed with `pip --no-deps --no-index --target` or,
# without pip (or with GPU_CHECK_NO_PIP=1), unpacked with Python's zipfile.
#
# GPU_CHECK_CPU=1 rehearses on the CPU: the bench stages run `--device cpu --config tiny --size 56
# --reps 1 --steps 2` (the CUDA tests skip), to time the stages' fixed costs where no GPU is.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/bench/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "gpu_check.sh needs Python >= 3.10 with torch (set PYTHON=...); $PY is $("$PY" --version 2>&1 | head -n 1)" >&2
  exit 2
fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_check.sh needs torch in $PY (set PYTHON=... to a Python that has it)" >&2
  exit 2
fi
BUDGET=${GPU_CHECK_BUDGET:-570}
LIMIT_ENV=${LIMIT_ENV:-60}
LIMIT_TESTS=${LIMIT_TESTS:-150}
LIMIT_QUICK=${LIMIT_QUICK:-270}
START=$SECONDS
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
: > "$OUT/summary.tsv"
NOTES="$OUT/wheels.txt"
: > "$NOTES"

# ------------------------------------------------------------------ summary
write_summary() {
  {
    printf 'GPU check, %s s of %s s used\n' "$((SECONDS - START))" "$BUDGET"
    printf '%-14s %-10s %4s %8s %6s\n' stage status rc seconds limit
    while IFS=$'\t' read -r name status rc secs limit; do
      printf '%-14s %-10s %4s %8s %6s\n' "$name" "$status" "$rc" "$secs" "$limit"
    done < "$OUT/summary.tsv"
  } > "$OUT/summary.txt"
  {
    printf '{"budget_s": %s, "used_s": %s, "stages": [' "$BUDGET" "$((SECONDS - START))"
    local sep=""
    while IFS=$'\t' read -r name status rc secs limit; do
      printf '%s{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s}' \
        "$sep" "$name" "$status" "$rc" "$secs" "$limit"
      sep=", "
    done < "$OUT/summary.tsv"
    printf ']}\n'
  } > "$OUT/.summary.json.tmp" && mv "$OUT/.summary.json.tmp" "$OUT/summary.json"
}

record() {  # name status rc seconds limit
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/summary.tsv"
  write_summary
  echo "== $1: $2 (rc $3) in $4 s (limit $5 s)"
}

run_stage() {  # name limit what command...: output to $OUT/<name>.txt line by line; killed at the limit
  local name=$1 limit=$2 what=$3 t0=$SECONDS rc status
  shift 3
  echo "== $name (limit $limit s): $what"
  echo "== $name (limit $limit s): $what" > "$OUT/$name.txt"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.txt" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed-out" ;;
    *) status=failed ;;
  esac
  tail -n +2 "$OUT/$name.txt" | tail -n 25
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit"
}

skip_stage() {  # name limit reason
  echo "$3" > "$OUT/$1.txt"
  echo "   $3"
  record "$1" skipped 0 0 "$2"
}

# ------------------------------------------------------------------ carried wheels
install_wheels() {  # target wheels...
  local target=$1
  shift
  mkdir -p "$target"
  if [ -z "${GPU_CHECK_NO_PIP:-}" ] && "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-deps --no-index --target "$target" "$@"
  else
    local w
    for w in "$@"; do "$PY" -m zipfile -e "$w" "$target" || return 1; done
  fi
}

WHEEL_DIR=${WHEELS:-$ROOT/shared/wheels}
ARG_WHEEL=${1:-${TRANSFORMERS_WHEEL:-$(ls shared/transformers-*.whl 2> /dev/null | head -n 1)}}
TEST_WHEELS=()
LIB_WHEELS=()
for w in "$WHEEL_DIR"/*.whl $ARG_WHEEL; do
  [ -f "$w" ] || continue
  case $(basename "$w") in
    pytest-* | pluggy-* | iniconfig-* | packaging-* | pygments-* | Pygments-*) TEST_WHEELS+=("$w") ;;
    *) LIB_WHEELS+=("$w") ;;
  esac
done
SITE=$(mktemp -d)
if [ ${#TEST_WHEELS[@]} -gt 0 ] && ! "$PY" -c "import pytest" > /dev/null 2>&1; then
  if install_wheels "$SITE/test" "${TEST_WHEELS[@]}" >> "$NOTES" 2>&1; then
    export PYTHONPATH=$PYTHONPATH:$SITE/test
    echo "pytest: carried (${TEST_WHEELS[*]##*/})" >> "$NOTES"
  else
    echo "pytest: the carried wheels did not install" >> "$NOTES"
  fi
fi
if [ ${#LIB_WHEELS[@]} -gt 0 ]; then
  CHECK_IMPORT='import huggingface_hub, transformers
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
print("transformers", transformers.__version__, "huggingface_hub", huggingface_hub.__version__)'
  if ! install_wheels "$SITE/lib" "${LIB_WHEELS[@]}" >> "$NOTES" 2>&1; then
    echo "carried wheels (${LIB_WHEELS[*]##*/}) did not install; using the installed transformers" >> "$NOTES"
  elif ERR=$(PYTHONPATH=$SITE/lib:$PYTHONPATH "$PY" -c "$CHECK_IMPORT" 2>&1); then
    export PYTHONPATH=$SITE/lib:$PYTHONPATH
    echo "carried: $ERR (${LIB_WHEELS[*]##*/})" >> "$NOTES"
  else
    echo "carried transformers failed to import ($(echo "$ERR" | tail -n 1)); falling back to the installed one" >> "$NOTES"
  fi
fi

# ------------------------------------------------------------------ stages
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
ENV_REPORT='import platform, sys, torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for name in ("transformers", "huggingface_hub", "safetensors", "torchvision", "pytest"):
    try:
        m = __import__(name)
        print(name, m.__version__, m.__file__)
    except Exception as e:
        print(name, "not importable:", type(e).__name__, e)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}", p.name, f"sm{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("no CUDA device")'
run_stage 1-env "$LIMIT_ENV" "carried wheels, versions, devices" bash -c \
  'cat "$1"; "$2" -c "$3" || exit; if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi' \
  env "$NOTES" "$PY" "$ENV_REPORT"

BENCH_ARGS=()
if [ -n "${GPU_CHECK_CPU:-}" ]; then
  BENCH_ARGS=(--device cpu --config tiny --size 56 --reps 1 --steps 2)
fi
if [ "$CUDA" = 1 ] || [ -n "${GPU_CHECK_CPU:-}" ]; then
  run_stage 2-cuda-tests "$LIMIT_TESTS" "pytest -k cuda test/test_cuda.py test/test_quant.py" \
    "$PY" -m pytest -v -rs -p no:cacheprovider -k cuda test/test_cuda.py test/test_quant.py
  run_stage 3-bench-quick "$LIMIT_QUICK" "bench/gpu.py --quick ${BENCH_ARGS[*]}" \
    "$PY" bench/gpu.py --quick --out "$OUT/3-bench-quick" "${BENCH_ARGS[@]}"
  LEFT=$((BUDGET - (SECONDS - START) - 10))
  if [ "$LEFT" -ge 90 ]; then
    run_stage 4-bench-full "$LEFT" "bench/gpu.py ${BENCH_ARGS[*]}" \
      "$PY" bench/gpu.py --out "$OUT/4-bench-full" "${BENCH_ARGS[@]}"
  else
    skip_stage 4-bench-full 0 "not run: $LEFT s left of the $BUDGET s budget (it needs 90)"
  fi
else
  skip_stage 2-cuda-tests "$LIMIT_TESTS" "no CUDA: the CUDA tests are skipped"
  skip_stage 3-bench-quick "$LIMIT_QUICK" "no CUDA: bench/gpu.py --quick is skipped"
  skip_stage 4-bench-full 0 "no CUDA: bench/gpu.py is skipped"
fi
cat "$OUT/summary.txt"
! cut -f2 "$OUT/summary.tsv" | grep -qx -e failed -e timed-out
