"""Offline extraction throughput: `qvl-ros extract` end to end versus `encode` on frames in memory.

    scripts/run.sh python bench/extract_bench.py [--sets 48] [--batch 4] [--size 240x320] [--repeats 3]

Writes a synthetic recording (three cameras: rgb8, bgr8 and JPEG, jittered stamps), then, in
alternation so that background load hits both alike:
  encode   BatchedQwenVL.encode on the same frames, already decoded and in memory, in the same
           batches (the upper bound: model time only);
  extract  the whole tool in-process: read the bag, deserialize, decode, synchronize, encode,
           serialize and write the mcap bag (model loading excluded, as for encode).
Reports sets/s of both, their ratio (target >= 0.90) as best-vs-best and as the median over
back-to-back pairs, the cost of reading + decoding + synchronizing alone, the device, the thread
count and the load average (other processes on the machine skew single runs).
Model: the bundled tiny Qwen2.5-VL (tests' size), so the model is cheap and the tool's own
overhead shows as much as it ever will.
"""
from __future__ import annotations

import argparse
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
from qvl_ros.bag_io import CameraBags  # noqa: E402
from qvl_ros.conversion import msg_to_tensor  # noqa: E402
from qvl_ros.model import BatchedQwenVL, default_tiny_checkpoint  # noqa: E402
from qvl_ros.synthetic_bags import CameraSpec, write_camera_bag  # noqa: E402

TOPICS = ["/front/image_raw", "/left/image_raw", "/right/image_raw/compressed"]
PROMPT = "Describe the scene."


def _frames_in_memory(bag: Path, cameras: int, device) -> list[list[torch.Tensor]]:
    """Every set's frames decoded once, as the tool decodes them (one frame per camera per tick)."""
    per_cam: list[list[torch.Tensor]] = [[] for _ in range(cameras)]
    with CameraBags([bag], TOPICS) as bags:
        for k, _, raw in bags.records():
            per_cam[k].append(msg_to_tensor(bags.deserialize(k, raw), device))
    return [list(s) for s in zip(*per_cam)]


def _time_encode(model, sets, batch) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(sets), batch):
        chunk = sets[i:i + batch]
        model.encode(chunk, [PROMPT] * len(chunk))
    return time.perf_counter() - t0


def _time_read_only(bag: Path, device) -> float:
    cfg = ex.ExtractConfig(inputs=[bag], output="unused", topics=TOPICS, device=str(device))
    t0 = time.perf_counter()
    with CameraBags([bag], TOPICS) as bags:
        source = ex._SetSource(bags, cfg, device)
        n = sum(1 for _ in source)
    assert n > 0
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="240x320", help="HxW of every camera")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    device = torch.device(args.device)

    model = BatchedQwenVL.from_pretrained(default_tiny_checkpoint(), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        bag = Path(tmp) / "cams"
        write_camera_bag(bag, [CameraSpec(TOPICS[0], h, w, "rgb8"), CameraSpec(TOPICS[1], h, w, "bgr8", latency=0.01),
                               CameraSpec(TOPICS[2], h, w, "jpeg", latency=0.02)], ticks=args.sets)
        sets = _frames_in_memory(bag, len(TOPICS), device)
        assert len(sets) == args.sets
        _time_encode(model, sets[: args.batch], args.batch)  # warm-up
        encode_s, extract_s = [], []
        load_before = os.getloadavg()[0]

        def run_extract(r):
            report = ex.extract(ex.ExtractConfig(inputs=[bag], output=Path(tmp) / f"out{r}", topics=TOPICS,
                                                 device=str(device), batch=args.batch, prompt=PROMPT,
                                                 prefetch=args.prefetch, handle_signals=False), progress="none")
            assert report.sets_written == args.sets and report.error is None, ex.format_summary(report)
            return report.elapsed_s

        for r in range(args.repeats):  # back-to-back pairs, order alternating, so both see the same load
            if r % 2 == 0:
                encode_s.append(_time_encode(model, sets, args.batch))
                extract_s.append(run_extract(r))
            else:
                extract_s.append(run_extract(r))
                encode_s.append(_time_encode(model, sets, args.batch))
        read_s = min(_time_read_only(bag, device) for _ in range(2))
        load_after = os.getloadavg()[0]

    n = args.sets
    best_enc, best_ext = n / min(encode_s), n / min(extract_s)
    pair_ratios = [e / x for e, x in zip(encode_s, extract_s)]  # (extract sets/s) / (encode sets/s)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": str(device), "device_name": dev_name, "torch": torch.__version__,
        "model": "bundled tiny Qwen2.5-VL (vision depth 4, width 64; text 2 layers)",
        "cameras": "3 (rgb8, bgr8, JPEG q90)", "size": f"{h}x{w}", "sets": n, "batch": args.batch,
        "repeats": args.repeats, "prefetch": args.prefetch,
        "encode_s": encode_s, "extract_s": extract_s,
        "encode_sets_per_s_best": best_enc, "extract_sets_per_s_best": best_ext,
        "ratio_best": best_ext / best_enc, "ratio_median_of_pairs": statistics.median(pair_ratios),
        "read_decode_sync_ms_per_set": 1000 * read_s / n,
        "load_average_1min": [load_before, load_after],
    }
    print(f"Offline extraction vs encode on frames in memory — device: {dev_name}, torch {torch.__version__}")
    print(f"model: {result['model']}; {result['cameras']} of {h}x{w}; {n} sets, batch {args.batch}; "
          f"{args.repeats} back-to-back pairs")
    print()
    print("| path | sets/s (best) | sets/s (each run) |")
    print("|---|---|---|")
    print(f"| encode, frames in memory | {best_enc:.1f} | {' '.join(f'{n / t:.1f}' for t in encode_s)} |")
    print(f"| qvl-ros extract, end to end | {best_ext:.1f} | {' '.join(f'{n / t:.1f}' for t in extract_s)} |")
    print()
    print(f"ratio extract / encode: {result['ratio_best']:.1%} (best vs best), "
          f"{result['ratio_median_of_pairs']:.1%} (median of back-to-back pairs); target >= 90%")
    print(f"reading + deserializing + decoding + synchronizing alone: {result['read_decode_sync_ms_per_set']:.2f} ms "
          f"per set; model: {1000 / best_enc:.1f} ms per set")
    print(f"1-min load average before/after: {load_before:.2f} / {load_after:.2f} "
          f"(above ~{torch.get_num_threads()} means other processes shared the cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
