"""The GPU check's pieces on the CPU: bench/gpu.py's rows, its JSON after a kill, and
scripts/gpu_check.sh's dry run (no CUDA: the CUDA stages say so and the check moves on).

The kill is a real SIGKILL of a running benchmark process, sent after its Nth row is in the JSON
(polled), at whatever point of the next row it has reached: the JSON must still parse and hold
every row finished, complete. The carried-wheel fallback is driven by a wheel made here whose
transformers cannot be imported.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"name", "params", "ours", "reference", "unit", "ratio", "device", "dtype"}
TINY = ["--device", "cpu", "--config", "tiny", "--size", "56", "--reps", "1", "--steps", "2"]


def test_gpu_bench_runs_on_the_cpu(tmp_path):
    """bench/gpu.py end to end on tiny dimensions and small frames: every row, the int4 rows, the
    targets list with limits scaled to the device found (measured figures for a CPU)."""
    from bench import gpu

    assert gpu.main(TINY + ["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert report["machine"]["device"] == "cpu" and report["quick"] is False
    names = {r["name"] for r in report["rows"]}
    assert {"warmup", "vision", "encode", "decode step", "caption", "int4 weights", "int4 decode step",
            "int4 caption", "bfloat16 error vision", "bfloat16 error hidden"} <= names
    assert all(r["ours"] > 0 and ROW_KEYS <= set(r) for r in report["rows"])
    assert {r["params"]["frames"] for r in report["rows"] if r["name"] == "vision"} == {12, 32}
    steps = [r for r in report["rows"] if r["name"] == "decode step"]
    assert {r["params"]["B"] for r in steps} == {1, 4, 8}
    for r in steps:  # the roofline counts the KV cache: more rows read more
        assert r["kv_read_bytes"] > 0 and r["params"]["cache"] >= r["params"]["steps"]
    assert steps[0]["kv_read_bytes"] < steps[-1]["kv_read_bytes"]
    int4 = next(r for r in report["rows"] if r["name"] == "int4 weights")
    assert 0 < int4["fraction"] < 1
    spec = report["measures"]["spec"]
    assert spec["source"] == "measured in this run" and spec["bandwidth"] == report["measures"]["copy_bandwidth"]
    assert len(report["targets"]) == 13
    for t in report["targets"]:
        assert set(t) == {"target", "measured", "limit", "met"} and t["met"] in (True, False, None)
    scaled = next(t for t in report["targets"] if t["target"].startswith("decode step at batch 1 <="))
    assert scaled["limit"] == pytest.approx(2.6 * 4.8e12 / spec["bandwidth"], rel=1e-3)
    errors = [t for t in report["targets"] if "error" in t["target"]]
    assert all(t["measured"] is not None for t in errors)  # measured at any size
    assert (tmp_path / "gpu-cpu.md").read_text().startswith("# GPU benchmark: cpu")


def test_device_targets_by_name():
    from bench.gpu import device_spec

    assert device_spec("NVIDIA H100 80GB HBM3", 1, 1)["bandwidth"] == 3.35e12
    assert device_spec("NVIDIA H100 PCIe", 1, 1)["bandwidth"] == 2.0e12
    assert device_spec("NVIDIA H200", 1, 1)["bandwidth"] == 4.8e12
    assert device_spec("NVIDIA GH200 480GB", 1, 1)["bandwidth"] == 4.0e12
    assert device_spec("NVIDIA L4", 1, 1)["flops"] == 121e12
    assert device_spec("NVIDIA L40S", 1, 1)["flops"] == 362e12
    assert device_spec("Some GPU", 7.0, 9.0) == {"bandwidth": 7.0, "flops": 9.0, "source": "measured in this run"}


def test_killed_quick_bench_leaves_every_finished_row(tmp_path):
    kill_after = 3
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", *TINY, "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, rows = tmp_path / "gpu-cpu.json", []
    try:
        deadline = time.monotonic() + 900
        while len(rows) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if path.exists():
                rows = json.loads(path.read_text())["rows"]  # parses at every moment: renamed in whole
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and len(rows) >= kill_after
    report = json.loads(path.read_text())
    assert report["quick"] is True and report["rows"][:len(rows)] == rows
    assert all(ROW_KEYS <= set(r) and r["ours"] > 0 for r in report["rows"])
    assert "bfloat16 error hidden" not in {r["name"] for r in report["rows"]}  # cut short, not finished
    assert [t["target"] for t in report["targets"]]  # evaluated on the rows so far
    assert (tmp_path / "gpu-cpu.md").read_text().startswith("# GPU benchmark: cpu")


def broken_transformers_wheel(where: Path) -> Path:
    """A wheel whose transformers package fails at import (as 5.23 does with too old a hub)."""
    path = where / "transformers-5.23.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("transformers/__init__.py", "raise ImportError('huggingface-hub>=1.31 is required')\n")
        z.writestr("transformers-5.23.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: transformers\n"
                   "Version: 5.23.0\n")
        z.writestr("transformers-5.23.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("transformers-5.23.0.dist-info/RECORD", "")
    return path


def test_gpu_check_dry_run_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the dry run is for machines without one")
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    broken_transformers_wheel(wheels)
    env = dict(os.environ, OUT=str(out), WHEELS=str(wheels), GPU_CHECK_NO_PIP="1", PYTHON=sys.executable,
               LIMIT_ENV="600")  # a busy 2-core machine imports torch slowly
    run = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    stages = ["1-env", "2-cuda-tests", "3-bench-quick", "4-bench-full"]
    assert all((out / f"{s}.txt").exists() for s in stages)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == stages
    assert [s["status"] for s in summary["stages"]] == ["ok", "skipped", "skipped", "skipped"]
    for s in stages[1:]:
        assert (out / f"{s}.txt").read_text().startswith("no CUDA")
    env_report = (out / "1-env.txt").read_text()
    assert "carried transformers failed to import (ImportError: huggingface-hub>=1.31 is required); " \
           "falling back to the installed one" in env_report
    import transformers

    assert f"transformers {transformers.__version__} {transformers.__file__}" in env_report  # the installed one
    assert "no CUDA device" in env_report
    assert "1-env          ok" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("hidden", ["transformers", "torch"])
def test_gpu_bench_names_a_missing_package_in_one_line(hidden):
    """A Python without one of the benchmark's packages gets one line naming it, and exit 1,
    before anything runs (the package is made unimportable in a child interpreter)."""
    code = (f"import sys, runpy; sys.modules[{hidden!r}] = None; sys.argv = ['bench/gpu.py', '--help']; "
            "runpy.run_path('bench/gpu.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing: " + hidden in lines[0] and sys.executable in lines[0], r.stderr


def test_gpu_check_refuses_a_python_without_torch(tmp_path):
    """scripts/gpu_check.sh stops with one line and exit 2 when its Python cannot import torch."""
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.modules[\"torch\"] = None; "
                    "exec(sys.argv[1])' \"$2\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"gpu_check.sh needs torch in {fake} (set PYTHON=... to a Python that has it)"], r.stderr
