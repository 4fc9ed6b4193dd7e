"""The benchmark code runs: every row of `bench/run.py` (sub-benchmarks included), the quant
benchmark and the reliability attack once at the smallest size, each writing a results file that
parses.

These are not measurements (the numbers of a smoke run mean nothing); they keep `make bench`
from breaking unnoticed between benchmark runs. The oracle for the rows' own numbers is
transformers inside each row (its error column); here only that every row ran and was written.
The reliability attack's own verdicts (refused, failed, exited) are checked: they are behaviour,
not timings.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_bench_run_smoke_writes_every_row(tmp_path):
    _run(["bench/run.py", "--smoke", "--out", str(tmp_path)], timeout=840)
    report = json.loads((tmp_path / "smoke.json").read_text())
    names = {r["name"] for r in report["results"]}
    # bench/run.py's own rows, then the sub-benchmarks (clips, extraction, fleet, node, detections)
    assert names >= {"preprocess", "vision", "roofline", "ops", "encode", "generate",
                     "video", "extract", "fleet", "node", "detect"}, names
    for r in report["results"]:
        assert r["ours"] is not None and r["ours"] > 0, r
        assert r["device"] == "cpu" and r["unit"], r
    clip = [r for r in report["results"] if r["name"] == "video"]
    assert clip and clip[0]["variant"] == "video_encode"
    # the rows that compare with transformers stay close to it even at the smallest size
    for r in report["results"]:
        if r["name"] in ("vision", "encode", "video") and isinstance(r["error"], float):
            assert r["error"] < 1e-3, r
    generate = [r for r in report["results"] if r["name"] == "generate"]
    assert generate[0]["error"] == "identical tokens"
    md = (tmp_path / "smoke.md").read_text()
    assert "| generate |" in md
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_quant_bench_smoke_writes_every_variant(tmp_path):
    _run(["bench/quant_bench.py", "--smoke", "--out", str(tmp_path / "quant")], timeout=600)
    report = json.loads((tmp_path / "quant.json").read_text())
    variants = [r["variant"] for r in report["rows"]]
    assert variants == ["float float32", "float bfloat16", "int4, float32 model", "int4, bfloat16 model"], variants
    assert report["linears"] and all(r["int4_ms"] > 0 for r in report["linears"])
    assert (tmp_path / "quant.md").read_text().startswith("#")


def test_reliability_bench_smoke_refuses_every_attack_and_keeps_the_node(tmp_path):
    """bench/reliability.py --quick: a managed qvl_node in its own process, synthetic cameras,
    over real DDS; every invalid parameter change and malformed checkpoint refused, the valid
    changes and lifecycle cycles without a failure, the node exiting 0 on SIGINT afterwards."""
    pytest.importorskip("rclpy")
    pytest.importorskip("qvl_ros.msg")
    _run(["bench/reliability.py", "--quick", "--tag", "smoke", "--out", str(tmp_path)], timeout=300)
    r = json.loads((tmp_path / "reliability-smoke.json").read_text())
    inv, val, lc, ck = r["invalid"], r["valid"], r["lifecycle"], r["checkpoints"]
    assert inv["cases"] > 31 and inv["refused"] == inv["cases"], inv["accepted"] + inv["unanswered"]
    assert inv["values_changed"] == [] and inv["features_after_5s"] > 0
    assert not val["refused"] and not val["unanswered"] and not val["failed"] and val["features_at_end"], val
    assert lc["completed"] == lc["cycles"] == 2 and lc["failed_cycles"] == 0, lc["rows"]
    assert lc["long_answers_responded"] == lc["long_answers"] == 1
    assert r["node_alive_at_end"] and r["node_exit_code"] == 0 and r["tracebacks_in_node_log"] == 0
    assert ck["cases"] >= 26 and ck["refused"] == ck["cases"], [c for c in ck["rows"] if not c["refused"]]
    assert (tmp_path / "reliability-smoke.md").read_text().startswith("# Reliability")
