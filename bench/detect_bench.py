"""Detections: model.detect with and without the grammar constraint, on the same frames and prompts.

    scripts/run.sh python bench/detect_bench.py [--batch 1 2] [--reps 2]

The small Qwen2.5-VL config of docs/architecture.md (random weights, float32), B samples x 3
cameras of 320x240, classes ["cup", "chair", "person"], at least 1 and at most 4 detections per
camera, greedy. Constrained: llguidance's per-step mask over the tokenizer (bench rows: `ours`);
unconstrained: the same prompts decoding the same number of new tokens (`reference`), so the
ratio is the cost of the mask per token. Random weights never write the format unconstrained, so
their detections/s is 0 here; with a trained checkpoint both parse. Decode tokens/s counts each
row's tokens up to its end token over the time after the prefill (the prefill is timed apart as
`model.encode` of the same rows). Writes bench/results/detect-cpu.json and .md; `make bench`
(bench/run.py) reports the same rows through :func:`run`.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qvl_ros.model import PRESETS, BatchedQwenVL, save_tiny_checkpoint  # noqa: E402
from qvl_ros.model.grounding import prompt_for  # noqa: E402

CAMERAS, H, W = 3, 240, 320
CLASSES = ["cup", "chair", "person"]
MAX_DETS = 4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _median_time(fn, reps: int):
    out = fn()  # warm-up (tokenizer tables, grammar compiler, layout caches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _tokens(dets) -> int:
    """Tokens decoded over all cameras, each up to and including its end token."""
    return sum(c.tokens for s in dets for c in s)


def measure(batches=(1,), reps: int = 2, preset: str = "small") -> list[dict]:
    torch.manual_seed(0)
    ckpt = Path(tempfile.mkdtemp(prefix="qvl_detect_bench_"))
    save_tiny_checkpoint(ckpt, config=PRESETS[preset], seed=0)
    model = BatchedQwenVL.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        frames = [[torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g) for _ in range(CAMERAS)]
                  for _ in range(B)]
        per_cam = [[im] for cams in frames for im in cams]
        prompts = [prompt_for(True, CLASSES)] * len(per_cam)
        t_prefill, _ = _median_time(lambda: model.encode(per_cam, prompts), reps)
        timing: dict = {}
        t_con, con = _median_time(lambda: model.detect(frames, CLASSES, constrained=True, min_detections=1,
                                                       max_detections=MAX_DETS, timing=timing), reps)
        steps = max(c.tokens for s in con for c in s)
        t_free, free = _median_time(lambda: model.detect(frames, CLASSES, constrained=False,
                                                         max_new_tokens=steps), reps)
        n_con = sum(len(c.detections) for s in con for c in s)
        n_free = sum(len(c.detections) for s in free for c in s)
        tok_con, tok_free = _tokens(con), _tokens(free)
        params = {"B": B, "N": CAMERAS, "size": f"{W}x{H}", "classes": len(CLASSES), "max_detections": MAX_DETS,
                  "reference": "unconstrained, same new tokens"}
        valid = sum(c.complete for s in con for c in s)
        rows.append({"name": "detect", "params": params, "unit": "detections/s", "ours": n_con / t_con,
                     "reference": n_free / t_free, "error": f"{valid}/{len(per_cam)} constrained answers valid",
                     "seconds": {"constrained": t_con, "unconstrained": t_free, "prefill": t_prefill},
                     "detections": {"constrained": n_con, "unconstrained": n_free}})
        rows.append({"name": "detect_decode", "params": {**params, "steps": steps}, "unit": "tokens/s",
                     "ours": tok_con / max(t_con - t_prefill, 1e-9),
                     "reference": tok_free / max(t_free - t_prefill, 1e-9), "error": None,
                     "tokens": {"constrained": tok_con, "unconstrained": tok_free},
                     "mask_ms_per_step": 1e3 * timing["grammar_seconds"] / max(timing["steps"], 1)})
        print(f"  detect B={B} N={CAMERAS}: constrained {rows[-2]['ours']:.2f} dets/s, "
              f"{rows[-1]['ours']:.1f} tokens/s; unconstrained {rows[-1]['reference']:.1f} tokens/s "
              f"({steps} steps, prefill {t_prefill * 1e3:.0f} ms)", flush=True)
    return rows


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """The rows `make bench` reports: B = 1 (and 2) x 3 cameras of 320x240 (smoke: B = 1 once, on
    the tiny model)."""
    if smoke:
        return measure(batches=(1,), reps=1, preset="tiny")
    return measure(batches=(1,) if quick else (1, 2), reps=1 if quick else 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    rows = measure(args.batch, args.reps)
    import llguidance

    meta = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "device": "cpu", "config": "small",
            "torch": torch.__version__, "llguidance": llguidance.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect-cpu.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [f"# Detections: constrained against unconstrained decoding ({meta['cpu']}, {meta['torch_threads']} "
             f"threads, cpu, float32, small config, llguidance {meta['llguidance']})", "",
             "| B x N (320x240) | steps | constrained dets/s | valid answers | constrained tokens/s | "
             "unconstrained tokens/s | mask ms/step | prefill ms |",
             "|---|---|---|---|---|---|---|---|"]
    for det, dec in zip(rows[::2], rows[1::2]):
        p = det["params"]
        lines.append(f"| {p['B']} x {p['N']} | {dec['params']['steps']} | {det['ours']:.2f} | "
                     f"{det['error'].split()[0]} | {dec['ours']:.1f} | {dec['reference']:.1f} | "
                     f"{dec['mask_ms_per_step']:.1f} | {det['seconds']['prefill'] * 1e3:.0f} |")
    lines += ["", f"Load average (1, 5, 15 min) at the end of the run: {meta['load_average']} on "
              f"{os.cpu_count()} cores. Tokens/s divide each camera's tokens (up to its end token) by the "
              "decode time of the whole batch, which runs until its longest answer ends; `mask ms/step` is "
              "the grammar's own host time per step, timed inside the decode loop."]
    (out / "detect-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
