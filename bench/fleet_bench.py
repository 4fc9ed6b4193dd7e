"""Sharded extraction on Ray with one worker versus one-process `qvl-ros extract`, both timed as
the commands a user types.

    scripts/run.sh python bench/fleet_bench.py [--model small|tiny] [--ticks 400] [--json out.json]

Writes a synthetic recording (three cameras at 5 Hz: rgb8, bgr8, JPEG; 240x320) and starts a
local Ray cluster (a fleet's cluster is up before its jobs; its start is reported on its own).
Then times fresh processes, from start to exit:
  one process  ``qvl-ros extract REC --out OUT ...`` (the reference): interpreter start, imports,
               model load, the whole extraction;
  sharded      ``qvl-ros extract REC --out SHARDS --ray ADDRESS --workers 1 ...`` joining that
               cluster: the driver's start, the plan, the worker's start (a process, its imports,
               the model load), every shard and the seam checks; with shards of ``--long``
               seconds and again with shards of ``--short`` seconds;
  merge        ``qvl-ros merge SHARDS --out MERGED`` of a long run (reported, not in the ratio: a
               run is merged once, after all its shards).
Reports sets/s of both (target: sharded >= 85% of one process) and what a sharded run adds: the
cluster's start, the start of the driver and the worker (wall time less the shards' own time),
and one shard (bag opened and closed, the overlap read, decoded and synchronized again, the
scheduling), as the time difference between the two shard lengths over the difference in shard
count. Every run uses --batch-window 2 (the shards are cut on that grid); the runs alternate, so
that background load hits all alike, and the best of the repeats counts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvl_ros.model import PRESETS, default_tiny_checkpoint, save_tiny_checkpoint  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

TOPICS = ["/front/image_raw", "/left/image_raw", "/right/image_raw/compressed"]
CLI = [sys.executable, "-m", "qvl_ros.offline.cli"]  # the code behind the `qvl-ros` command


def _recording(path: Path, ticks: int, h: int, w: int) -> None:
    write_camera_bag(path, [CameraSpec(TOPICS[0], h, w, "rgb8"), CameraSpec(TOPICS[1], h, w, "bgr8", latency=0.01),
                            CameraSpec(TOPICS[2], h, w, "jpeg", latency=0.02)], ticks=ticks, period=0.2)


def _command(*args: str) -> float:
    """Wall seconds of one `qvl-ros` command in a fresh process; its output is shown if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"qvl-ros {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return elapsed


def _extract_args(bag: Path, out: Path, model: Path) -> list[str]:
    return ["extract", str(bag), "--topics", *TOPICS, "--model", str(model), "--out", str(out), "--device", "cpu",
            "--batch", "4", "--batch-window", "2", "--progress", "none"]


def _sharded(bag: Path, out: Path, model: Path, address: str, shard_s: float) -> tuple[float, list[dict]]:
    elapsed = _command(*_extract_args(bag, out, model), "--ray", address, "--workers", "1",
                       "--shard-seconds", f"{shard_s:g}")
    return elapsed, [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))]


def _sets_in(bag: Path) -> int:
    from rosbags.rosbag2 import Reader

    with Reader(bag) as reader:
        return sum(c.msgcount for c in reader.connections if c.topic.endswith("/features"))


def measure(model_name: str, ticks: int, long_s: float, short_s: float, repeats: int, tmp: Path) -> dict:
    import ray

    model = (save_tiny_checkpoint(tmp / "small", config=PRESETS["small"], seed=0) if model_name == "small"
             else default_tiny_checkpoint())
    bag = tmp / "rec"
    _recording(bag, ticks, 240, 320)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    cluster_s = time.perf_counter() - t0
    address = ray.get_runtime_context().gcs_address
    try:
        one, long_runs, short_runs, merges = [], [], [], []
        for r in range(repeats):
            one.append(_command(*_extract_args(bag, tmp / f"one{r}", model)))
            long_runs.append(_sharded(bag, tmp / f"long{r}", model, address, long_s))
            short_runs.append(_sharded(bag, tmp / f"short{r}", model, address, short_s))
            merges.append(_command("merge", str(tmp / f"long{r}"), "--out", str(tmp / f"merged{r}")))
    finally:
        ray.shutdown()
    sets = _sets_in(tmp / "one0")
    assert all(_sets_in(tmp / f"merged{r}") == sets for r in range(repeats))
    assert all(sum(m["sets"] for m in mk) == sets for _, mk in long_runs + short_runs)
    one_s = min(one)
    long_best = min(t for t, _ in long_runs)
    short_best = min(t for t, _ in short_runs)
    n_long, n_short = len(long_runs[0][1]), len(short_runs[0][1])
    shard_work = min(sum(m["elapsed_s"] for m in mk) for _, mk in long_runs)
    return {
        "model": model_name, "ticks": ticks, "sets": sets, "cluster_start_s": cluster_s,
        "one_process_s": one_s, "sharded_s": long_best, "shards": n_long,
        "short_sharded_s": short_best, "short_shards": n_short, "merge_s": min(merges),
        "ratio": one_s / long_best,
        "ratio_median": statistics.median(o / s for o, (s, _) in zip(one, long_runs)),
        "per_shard_s": (short_best - long_best) / max(1, n_short - n_long),
        "start_s": long_best - shard_work,  # driver start, plan, worker start (imports, model load), scheduling
        "steady_ratio": one_s / shard_work,  # the shards only, the worker already up
        "overlap_s": long_runs[0][1][-1]["overlap_ns"] / 1e9,
    }


def run(quick: bool = False, device: str = "cpu", smoke: bool = False) -> list[dict]:
    """Rows for bench/run.py (make bench): sharded, one Ray worker, against one process (smoke:
    a 6 s recording in shards of 4 and 2 s, once)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        if smoke:
            raise
        return []
    model, ticks, repeats = ("tiny", 120, 1) if quick else ("small", 400, 2)
    long_s, short_s = 16.0, 4.0
    if smoke:
        model, ticks, repeats, long_s, short_s = "tiny", 30, 1, 4.0, 2.0
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(model, ticks, long_s, short_s, repeats, Path(tmp))
    return [{"params": {"size": "240x320", "cameras": 3, "sets": r["sets"], "model": model, "workers": 1,
                        "shards": r["shards"], "reference": "qvl-ros extract, one process"},
             "ours": r["sets"] / r["sharded_s"], "reference": r["sets"] / r["one_process_s"], "unit": "sets/s",
             "error": "bit-equal (test_fleet)", "ratio_median_of_pairs": round(r["ratio_median"], 3),
             "cluster_start_s": round(r["cluster_start_s"], 2), "start_s": round(r["start_s"], 2),
             "per_shard_s": round(r["per_shard_s"], 3), "overlap_s": r["overlap_s"], "merge_s": round(r["merge_s"], 2),
             "steady_ratio": round(r["steady_ratio"], 3)}]


def report_lines(r: dict) -> list[str]:
    return [
        f"one process: {r['one_process_s']:.2f} s = {r['sets'] / r['one_process_s']:.2f} sets/s",
        f"sharded, 1 Ray worker, {r['shards']} shards: {r['sharded_s']:.2f} s = {r['sets'] / r['sharded_s']:.2f} "
        f"sets/s -> **{r['ratio']:.0%}** of one process (median of pairs {r['ratio_median']:.0%}; target >= 85%); "
        f"the shards alone: {r['steady_ratio']:.0%}",
        f"added: Ray cluster start {r['cluster_start_s']:.2f} s (once per cluster); driver and worker start "
        f"(imports, model load, plan, scheduling) {r['start_s']:.2f} s (once per run and worker); "
        f"{r['per_shard_s']:.3f} s per shard with {r['overlap_s']:g} s of overlap ({r['short_shards']} shards: "
        f"{r['short_sharded_s']:.2f} s); merge {r['merge_s']:.2f} s (once per run)",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "small"], default="small")
    ap.add_argument("--ticks", type=int, default=400, help="ticks of the recording (5 Hz)")
    ap.add_argument("--long", type=float, default=16.0, help="shard seconds of the main sharded run")
    ap.add_argument("--short", type=float, default=4.0, help="shard seconds of the run that measures per-shard cost")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args.model, args.ticks, args.long, args.short, args.repeats, Path(tmp))
    import torch

    r.update(cpu=f"CPU ({os.cpu_count()} cores)", torch=torch.__version__, load_average=os.getloadavg())
    print(f"Sharded extraction vs one process, as commands — {r['cpu']}, torch {r['torch']}, model {r['model']}, "
          f"3 cameras 240x320, {r['sets']} sets")
    print("\n".join(report_lines(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
