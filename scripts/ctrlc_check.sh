#!/usr/bin/env bash
# Ctrl-C check of `ros2 launch qvl_ros multi_cam.launch.py synthetic:=true caption:=true`:
# 20 runs, SIGINT to the whole process group (launch, its nodes, a listener) at chosen moments
# (model load, warm-up, a batch, a caption; every other run a second SIGINT), each run checked
# for exit code 0 everywhere, "process has finished cleanly", no traceback, no "process has
# died"; prints one line per run and the count. Arguments go to test/launch_ctrlc.py, e.g.
#   scripts/ctrlc_check.sh --runs 4 --target launch --signal TERM
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec scripts/run.sh python test/launch_ctrlc.py "$@"
