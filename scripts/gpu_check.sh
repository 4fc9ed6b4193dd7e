#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine with its own Python, torch and transformers and
# no network: no venv, no ROS, nothing downloaded.
#
#   scripts/gpu_check.sh [transformers-*.whl]
#
# A transformers wheel given here (or in $TRANSFORMERS_WHEEL, or found as shared/transformers-*.whl)
# is installed without dependencies into a temporary directory and put first on PYTHONPATH. Then
# test/test_cuda.py runs and bench/gpu.py writes its results. Everything goes under $OUT when set
# (test log, bench log, results), else under bench/results. Exit status: that of the tests, or the
# benchmark's when the tests pass.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEST=${OUT:-$ROOT/bench/results}
mkdir -p "$DEST"
WHEEL=${1:-${TRANSFORMERS_WHEEL:-$(ls shared/transformers-*.whl 2>/dev/null | head -n 1)}}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ -n "$WHEEL" ]; then
  SITE=$(mktemp -d)/site
  python3 -m pip install --quiet --no-deps --no-index --target "$SITE" "$WHEEL" || exit 3
  export PYTHONPATH=$SITE:$PYTHONPATH
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' | tee "$DEST/gpu-check-env.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
python3 -m pytest -q -rs test/test_cuda.py 2>&1 | tee "$DEST/test_cuda.txt"
TESTS=${PIPESTATUS[0]}
python3 bench/gpu.py --out "$DEST" "${@:2}" 2>&1 | tee "$DEST/bench_gpu.txt"
BENCH=${PIPESTATUS[0]}
[ "$TESTS" -ne 0 ] && exit "$TESTS"
exit "$BENCH"
