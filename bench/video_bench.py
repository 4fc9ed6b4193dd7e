"""Clips against transformers' video path: encode of 3 cameras x T frames of 448², same weights.

    scripts/run.sh python bench/video_bench.py [--frames 4 8] [--batch 1 2] [--reps 2]

The small Qwen2.5-VL config of docs/architecture.md (random weights, float32). Reference: transformers 5.23's
processor (`videos=`, fps in `video_metadata`, no frame sampling) and
`Qwen2_5_VLForConditionalGeneration.model` one sample at a time, as on the model card; ours:
`BatchedQwenVL.encode` on the batch. Both from uint8 frames to the decoder's last hidden state.
Rows: frames/s (B x 3 x T frames per call), the ratio, peak memory of the first call above the
process baseline,
and the error mean(|ours - ref| / (|ref| + 1)) of vision tokens and hidden states.
Writes bench/results/video-<device>.json and .md; `make bench` (bench/run.py) reports the same
rows through :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory import peak_mb  # noqa: E402
from qvl_ros.model import PRESETS, BatchedQwenVL, save_tiny_checkpoint  # noqa: E402

CAMERAS, SIDE, FPS = 3, 448, 10.0
PROMPT = "What is moving?"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs() / (b.float().abs() + 1)).mean().item()


def timed(fn, reps: int):
    """(peak MB of the first call, median seconds of `reps` later calls, the last result)."""
    out = []
    mem = peak_mb(lambda: out.append(fn()))  # the first call also warms up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out[0] = fn()
        times.append(time.perf_counter() - t0)
    return mem, statistics.median(times), out[0]


def reference_encode(ref, proc, clips):
    """transformers: one sample (3 clips) from uint8 frames to hidden states and video tokens."""
    conv = [{"role": "user", "content": [{"type": "video"}] * len(clips) + [{"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    inp = proc(text=[text], videos=[c.permute(0, 2, 3, 1).numpy() for c in clips], return_tensors="pt",
               video_metadata=[{"fps": FPS, "total_num_frames": c.shape[0]} for c in clips],
               do_sample_frames=False, cap_pixels_per_frame=True)
    with torch.inference_mode():
        hidden = ref.model(**inp).last_hidden_state
        vis = ref.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output
    return hidden[0], vis


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(frames=(4, 8), batches=(1,), reps: int = 2, preset: str = "small", side: int = SIDE) -> list[dict]:
    """One row per (T, B): ours against transformers on the `preset` config's random weights."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    ckpt = Path(tempfile.mkdtemp(prefix="qvl_video_bench_"))
    save_tiny_checkpoint(ckpt, config=PRESETS[preset], seed=0)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(ckpt))
    ours = BatchedQwenVL.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    rows = []
    for T in frames:
        for B in batches:
            rows.append(_row(ours, ref, proc, T, B, reps, side))
    return rows


def _row(ours, ref, proc, T: int, B: int, reps: int, side: int) -> dict:
    g = torch.Generator().manual_seed(T * 10 + B)
    batch = [[torch.randint(0, 256, (T, 3, side, side), dtype=torch.uint8, generator=g)
              for _ in range(CAMERAS)] for _ in range(B)]
    prompts = [PROMPT] * B
    run_ours = lambda: ours.encode(batch, prompts, fps=FPS)  # noqa: E731
    run_ref = lambda: [reference_encode(ref, proc, s) for s in batch]  # noqa: E731
    m_ours, t_ours, feats = timed(run_ours, reps)
    m_ref, t_ref, refs = timed(run_ref, reps)
    L = feats.hidden.shape[1]
    err_v = max(rel_err(feats.vision[b][n], v) for b, (_, vis) in enumerate(refs) for n, v in enumerate(vis))
    err_h = max(rel_err(feats.hidden[b, L - h.shape[0]:], h) for b, (h, _) in enumerate(refs))
    n_frames = B * CAMERAS * T
    row = {"name": "video_encode", "params": {"B": B, "N": CAMERAS, "T": T, "size": f"{side}x{side}",
                                              "reference": "HF video path per sample"},
           "unit": "frames/s", "ours": n_frames / t_ours, "reference": n_frames / t_ref,
           "ratio": t_ref / t_ours, "error": max(err_v, err_h), "error_vision": err_v, "error_hidden": err_h,
           "peak_mem_mb": {"ours": m_ours, "reference": m_ref}, "device": "cpu", "dtype": "float32",
           "tokens_per_clip": feats.vision[0][0].shape[0]}
    print(f"  clips B={B} N={CAMERAS} T={T}: ours {row['ours']:.1f} ref {row['reference']:.1f} frames/s "
          f"({row['ratio']:.2f}x), err {row['error']:.1e}, peak MB {m_ours:.0f} / {m_ref:.0f}", flush=True)
    return row


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """The rows `make bench` reports: 3 cameras x 4 and 8 frames of 448² (quick: 4 frames; smoke:
    2 frames of 112² on the tiny model, once)."""
    if smoke:
        return measure(frames=(2,), reps=1, preset="tiny", side=112)
    return measure(frames=(4,) if quick else (4, 8), reps=1 if quick else 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    rows = measure(args.frames, args.batch, args.reps)
    meta = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "device": "cpu", "config": "small",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "video-cpu.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [f"# Clips: qvl_ros vs transformers' video path ({meta['cpu']}, {meta['torch_threads']} threads, "
             f"cpu, float32, small config)", "",
             "| B x N x T (448²) | ours frames/s | transformers frames/s | ratio | error | peak MB ours / ref |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        p = r["params"]
        lines.append(f"| {p['B']} x {p['N']} x {p['T']} | {r['ours']:.1f} | {r['reference']:.1f} | "
                     f"{r['ratio']:.2f}x | {max(r['error_vision'], r['error_hidden']):.1e} | "
                     f"{r['peak_mem_mb']['ours']:.0f} / {r['peak_mem_mb']['reference']:.0f} |")
    (out / "video-cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
