"""The README demo (`python -m qvl_ros.sim.demo`) runs end to end and exits 0."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("qvl_ros.msg")

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_library_and_ros_parts(tmp_path):
    env = dict(os.environ, QVL_ROS_CACHE=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "qvl_ros.demo", "--duration", "2", "--max-new-tokens", "4"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "vision  camera 0" in out and "encode" in out  # the library summary
    assert "features #1" in out and "vision/front" in out and "latency" in out
    assert "caption  stamp" in out
    assert "[ros] OK" in out
