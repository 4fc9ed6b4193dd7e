"""Sharded extraction on Ray with one worker versus one-process `qvl-ros extract` on the same input.

    scripts/run.sh python bench/fleet_bench.py [--model small|tiny] [--ticks 120] [--json out.json]

Writes a synthetic recording (three cameras at 5 Hz: rgb8, bgr8, JPEG; 240x320), then measures
  one process  ``extract()``: model load plus the whole extraction (the reference);
  sharded      ``run_sharded(--ray --workers 1)`` into a fresh shards directory, on a local Ray
               cluster started beforehand (a fleet's cluster is up before the jobs): the plan, the
               worker's start (a process, its imports, the model load), every shard and the seam
               checks, with shards of ``--long`` seconds and again with shards of ``--short`` seconds.
Reports sets/s of both (target: sharded >= 85% of one process), the Ray cluster's start, the
worker's start, and the added cost of one shard (bag opened and closed, the overlap read, decoded
and synchronized again, the scheduling): the time difference between the two shard lengths over
the difference in shard count. Both runs use --batch-window 2 (the shards are cut on that grid).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvl_ros import extract as ex  # noqa: E402
from qvl_ros.model import PRESETS, default_tiny_checkpoint, save_tiny_checkpoint  # noqa: E402
from qvl_ros.sim.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

TOPICS = ["/front/image_raw", "/left/image_raw", "/right/image_raw/compressed"]


def _recording(path: Path, ticks: int, h: int, w: int) -> None:
    write_camera_bag(path, [CameraSpec(TOPICS[0], h, w, "rgb8"), CameraSpec(TOPICS[1], h, w, "bgr8", latency=0.01),
                            CameraSpec(TOPICS[2], h, w, "jpeg", latency=0.02)], ticks=ticks, period=0.2)


def _config(bag: Path, out: Path, model: Path) -> "ex.ExtractConfig":
    return ex.ExtractConfig(inputs=[bag], output=out, topics=TOPICS, model=str(model), device="cpu", batch=4,
                            batch_window=2.0, handle_signals=False)


def _one_process(bag: Path, out: Path, model: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    report = ex.extract(_config(bag, out, model), progress="none")
    assert report.error is None, ex.format_summary(report)
    return time.perf_counter() - t0, report.sets_written


def _sharded(bag: Path, out: Path, model: Path, shard_s: float) -> tuple[float, int, list[dict]]:
    from qvl_ros.offline import fleet

    stream = io.StringIO()
    t0 = time.perf_counter()
    code = fleet.run_sharded(_config(bag, out, model), fleet.FleetOptions(workers=1, ray="local", shard_seconds=shard_s),
                             stream=stream, progress="none")
    elapsed = time.perf_counter() - t0
    assert code == 0, stream.getvalue()
    markers = [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))]
    return elapsed, sum(m["sets"] for m in markers), markers


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
    try:
        one, long_runs, short_runs = [], [], []
        for r in range(repeats):  # alternating, so that background load hits all alike
            one.append(_one_process(bag, tmp / f"one{r}", model))
            long_runs.append(_sharded(bag, tmp / f"long{r}", model, long_s))
            short_runs.append(_sharded(bag, tmp / f"short{r}", model, short_s))
    finally:
        ray.shutdown()
    sets = one[0][1]
    assert all(n == sets for _, n in one) and all(n == sets for _, n, _ in long_runs + short_runs)
    one_s = min(t for t, _ in one)
    long_s_best = min(t for t, _, _ in long_runs)
    short_s_best = min(t for t, _, _ in short_runs)
    n_long, n_short = len(long_runs[0][2]), len(short_runs[0][2])
    shard_work = min(sum(m["elapsed_s"] for m in mk) for _, _, mk in long_runs)
    return {
        "model": model_name, "ticks": ticks, "sets": sets, "cluster_start_s": cluster_s,
        "one_process_s": one_s, "sharded_s": long_s_best, "shards": n_long,
        "short_sharded_s": short_s_best, "short_shards": n_short,
        "ratio": one_s / long_s_best,
        "ratio_median": statistics.median(o / s for (o, _), (s, _, _) in zip(one, long_runs)),
        "per_shard_s": (short_s_best - long_s_best) / max(1, n_short - n_long),
        "worker_start_s": long_s_best - shard_work,  # process, imports, model load, plan, scheduling
        "steady_ratio": one_s / shard_work,  # shards only, the worker already up (a long run's rate)
        "overlap_s": long_runs[0][2][-1]["overlap_ns"] / 1e9,
    }


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Rows for bench/run.py (make bench): sharded, one Ray worker, against one process."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return []
    model, ticks, repeats = ("tiny", 120, 1) if quick else ("small", 400, 2)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(model, ticks, 16.0, 4.0, repeats, Path(tmp))
    return [{"params": {"size": "240x320", "cameras": 3, "sets": r["sets"], "model": model, "workers": 1,
                        "shards": r["shards"], "reference": "qvl-ros extract, one process"},
             "ours": r["sets"] / r["sharded_s"], "reference": r["sets"] / r["one_process_s"], "unit": "sets/s",
             "error": "bit-equal (test_fleet)", "ratio_median_of_pairs": round(r["ratio_median"], 3),
             "cluster_start_s": round(r["cluster_start_s"], 2), "worker_start_s": round(r["worker_start_s"], 2),
             "per_shard_s": round(r["per_shard_s"], 3), "overlap_s": r["overlap_s"],
             "steady_ratio": round(r["steady_ratio"], 3)}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "small"], default="small")
    ap.add_argument("--ticks", type=int, default=400, help="ticks of the recording (5 Hz)")
    ap.add_argument("--long", type=float, default=16.0, help="shard seconds of the main sharded run")
    ap.add_argument("--short", type=float, default=4.0, help="shard seconds of the run that measures per-shard cost")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from qvl_ros.model.kernels import tune_cpu_allocator

    tune_cpu_allocator()  # as `qvl-ros extract` runs; a Ray worker tunes its own process (bench/run.py tunes its own)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args.model, args.ticks, args.long, args.short, args.repeats, Path(tmp))
    r.update(cpu=f"CPU ({torch.get_num_threads()} threads)", torch=torch.__version__, load_average=os.getloadavg())
    print(f"Sharded extraction, 1 Ray worker, vs one process — {r['cpu']}, torch {r['torch']}, model {r['model']}, "
          f"3 cameras 240x320, {r['sets']} sets")
    print(f"one process (model load included): {r['one_process_s']:.2f} s = {r['sets'] / r['one_process_s']:.2f} sets/s")
    print(f"sharded, {r['shards']} shards: {r['sharded_s']:.2f} s = {r['sets'] / r['sharded_s']:.2f} sets/s "
          f"-> **{r['ratio']:.0%}** of one process (median of pairs {r['ratio_median']:.0%}; target >= 85%); "
          f"shards alone, the worker up: {r['steady_ratio']:.0%}")
    print(f"Ray cluster start (once per cluster): {r['cluster_start_s']:.2f} s; worker start and model load "
          f"(once per worker): {r['worker_start_s']:.2f} s; added cost per shard (overlap {r['overlap_s']:g} s): "
          f"{r['per_shard_s']:.3f} s ({r['short_shards']} shards: {r['short_sharded_s']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
