"""4-bit decoder (AWQ / GPTQ on torch's int4 kernels) against the same weights in float32 and bfloat16.

    scripts/run.sh python bench/quant_bench.py [--config 3b-slice|small] [--method awq|gptq] [--device cpu|cuda]
    scripts/run.sh python bench/quant_bench.py --smoke --out DIR/quant   (the code once, small config, 2 steps)

Writes a quantized checkpoint (group size 128) and its float twin (the same weights, dequantized),
loads each as int4 and as float models, and reports per variant:
  decoder weight bytes  parameters and buffers of the decoder layers (what quantization shrinks;
                        embeddings, lm_head and the vision tower stay float in the releases)
  load                  from_pretrained seconds and peak memory it adds
  decode step           ms per token at batch 1 and 4: decoder steps (and logits) after a
                        128-token context, fastest of --repeats runs of --steps steps
  caption               seconds for one 32-token caption of one 224x224 camera (vision and
                        prefill included; end tokens disabled), and the peak memory it adds
  tokens                whether the greedy tokens equal the float32 twin's
and one decoder linear alone (int4 / float32 / bfloat16 at 1, 4 and 64 rows), which other
processes on a shared machine disturb much less than whole decode steps.
Config "3b-slice": Qwen2.5-VL-3B's decoder shapes (hidden 2048, intermediate 11008, 16/2 heads)
with 4 of its 36 layers and the small vision tower, so the per-layer weight traffic of the real
model at a size this machine holds twice over; "small": the benchmark config of bench/run.py.
Writes bench/results/quant-<device>.json and .md (override with --out); prints the command line
for the GPU run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import peak_rss_reset, process_peak_mb  # noqa: E402
from qvl_ros.model import PRESETS, BatchedQwenVL, save_tiny_checkpoint  # noqa: E402
from qvl_ros.model.quant import weight_bytes  # noqa: E402

CONFIGS = {
    "3b-slice": replace(PRESETS["small"], hidden=2048, intermediate=11008, layers=4, heads=16, kv_heads=2,
                        mrope_section=(16, 24, 24), vision_out=2048),
    "small": PRESETS["small"],
}
GPU_COMMAND = "scripts/run.sh python bench/quant_bench.py --device cuda --config 3b-slice"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device, fn):
    """(result of fn(), peak memory in MB it adds: host RSS on the CPU, allocated memory on CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    base = peak_rss_reset() / 2 ** 20
    out = fn()
    return out, max(0.0, process_peak_mb() - base)


def best(device, fn, repeats: int) -> float:
    """Fastest of `repeats` runs of fn() after one warm-up, in seconds (the minimum: other
    processes on a shared machine only ever add time)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def camera(seed: int, size=224):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)


@torch.inference_mode()
def decode_steps(model, B: int, steps: int, context: int = 128) -> None:
    """`steps` decode steps of B rows after a `context`-token prompt (cache filled with zeros):
    the per-token work of generation, without vision and prefill, through the model's own
    static-shape step (a CUDA graph on CUDA)."""
    state, step = model.steps.get(B, context + steps)
    dev = model.device
    state.begin(torch.ones(B, context, dtype=torch.long, device=dev), torch.full((B,), context, device=dev))
    tok = torch.zeros(B, dtype=torch.long, device=dev)
    for _ in range(steps):
        state.tok[:B] = tok
        tok = step()[:B].argmax(-1)


@torch.inference_mode()
def linear_rows(cfg, device, repeats: int = 10) -> list[dict]:
    """One decoder linear alone (the config's gate_up and down shapes, random weights, group 128):
    ms per call of the int4 kernel (bfloat16) against dense float32 and bfloat16 weights, at the
    batch sizes of decode (1, 4) and of a short prefill (64 rows)."""
    from qvl_ros.model.kernels import linear
    from qvl_ros.model.quant import Int4Weight

    rows = []
    for name, (N, K) in (("gate_up", (2 * cfg.intermediate, cfg.hidden)), ("down", (cfg.hidden, cfg.intermediate))):
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
        zeros = torch.randint(0, 16, (K // 128, N), dtype=torch.int32, generator=g)
        w4 = Int4Weight.pack(q, zeros, torch.rand(K // 128, N, generator=g) / 100, torch.arange(K) // 128, 128, device)
        w32 = torch.randn(N, K, generator=g).to(device)
        w16 = w32.bfloat16()
        for M in (1, 4, 64):
            x = torch.randn(M, K, generator=g).to(device)
            row = {"linear": f"{name} {N}x{K}", "rows": M}
            for kind, fn in (("int4", lambda: w4(x)), ("float32", lambda: linear(x, w32)),
                             ("bfloat16", lambda: linear(x.bfloat16(), w16))):
                row[f"{kind}_ms"] = round(1000 * best(device, fn, repeats), 3)
            rows.append(row)
            print("   ", json.dumps(row), flush=True)
    return rows


def measure(path, device, dtype, steps: int, repeats: int, reference_ids=None,
            caption_tokens: int = 32) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    model, load_mb = peak(device, lambda: BatchedQwenVL.from_pretrained(path, device=device, dtype=dtype))
    row = {"decoder_weight_bytes": weight_bytes(model.decoder.layers), "load_s": round(time.perf_counter() - t0, 2),
           "load_peak_mb": round(load_mb, 1)}
    model.eos_ids = []  # every caption decodes the full number of tokens
    for B in (1, 4):
        row[f"decode_step_ms_b{B}"] = round(1000 * best(device, lambda: decode_steps(model, B, steps), repeats) / steps, 2)
    imgs, prompts = [[camera(0)]], ["Describe the scene."]
    caption = lambda: model.generate_ids(imgs, prompts, max_new_tokens=caption_tokens)  # noqa: E731
    row["caption_s"] = round(best(device, caption, 1), 3)
    ids, row["caption_peak_mb"] = peak(device, caption)
    row["caption_peak_mb"] = round(row["caption_peak_mb"], 1)
    row["tokens_equal_float32"] = None if reference_ids is None else bool(torch.equal(ids.cpu(), reference_ids))
    del model
    gc.collect()
    return row, ids.cpu()


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# 4-bit decoder: {report['method'].upper()} group 128, config {report['config']}", "",
             f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), device {m['device']}, "
             f"torch {m['torch']}, load average {report['load_average']}; decode: fastest of {report['repeats']} "
             f"runs of {report['steps']} steps.", "",
             "| variant | decoder weights MB | vs bf16 | decode step ms (B=1) | decode step ms (B=4) | "
             "caption 32 tok s | load peak MB | caption peak MB | tokens = float32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    bf16 = next(r["decoder_weight_bytes"] for r in report["rows"] if r["variant"] == "float bfloat16")
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['decoder_weight_bytes'] / 2 ** 20:.1f} | "
                     f"{r['decoder_weight_bytes'] / bf16:.0%} | {r['decode_step_ms_b1']} | {r['decode_step_ms_b4']} | "
                     f"{r['caption_s']} | {r['load_peak_mb']} | {r['caption_peak_mb']} | {r['tokens_equal_float32']} |")
    lines += ["", "One decoder linear alone (random weights, group 128), ms per call, fastest of 10:", "",
              "| linear | rows | int4 (bfloat16) | float32 | bfloat16 | int4 vs float32 |", "|---|---|---|---|---|---|"]
    for r in report["linears"]:
        lines.append(f"| {r['linear']} | {r['rows']} | {r['int4_ms']} | {r['float32_ms']} | {r['bfloat16_ms']} | "
                     f"{r['float32_ms'] / r['int4_ms']:.2f}x |")
    lines += ["", "int4 rows run the decoder linears on torch's int4 kernels computing in bfloat16 (the rest of "
              "the model in the row's dtype); float rows load the twin checkpoint (the same weights, dequantized). "
              "Decoder weights: the decoder layers only (embeddings, lm_head and vision stay float).",
              "", f"GPU run: `{GPU_COMMAND}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="3b-slice")
    ap.add_argument("--method", choices=["awq", "gptq"], default="awq")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="path prefix (default bench/results/quant-<device>)")
    ap.add_argument("--smoke", action="store_true",
                    help="every row once on the small config with 2 steps (checks the code, measures nothing)")
    args = ap.parse_args(argv)
    caption_tokens, linear_repeats = 32, 10
    if args.smoke:
        args.config, args.steps, args.repeats, caption_tokens, linear_repeats = "small", 2, 1, 4, 1
    device = torch.device(args.device)
    t_start = time.perf_counter()
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.bfloat16, torch.float32]
    print("  one linear ...", flush=True)
    linears = linear_rows(CONFIGS[args.config], device, linear_repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_checkpoint(Path(tmp) / "q", config=CONFIGS[args.config], quantize=args.method,
                                    group_size=128)
        twin = Path(f"{path}-float")
        rows, ref_ids = [], None
        for kind, p in (("float", twin), ("int4", path)):
            for dt in dtypes:
                name = f"{kind} {str(dt).split('.')[-1]}" if kind == "float" else f"int4, {str(dt).split('.')[-1]} model"
                print(f"  {name} ...", flush=True)
                row, ids = measure(p, device, dt, args.steps, args.repeats, ref_ids, caption_tokens)
                if kind == "float" and dt == torch.float32:
                    ref_ids = ids
                    row["tokens_equal_float32"] = True
                rows.append({"variant": name, **row})
                print("   ", json.dumps(rows[-1]), flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    report = {"load_average": [round(x, 1) for x in os.getloadavg()], "config": args.config, "method": args.method, "group_size": 128, "steps": args.steps,
              "repeats": args.repeats, "rows": rows, "linears": linears, "seconds": round(time.perf_counter() - t_start, 1),
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                                   if device.type == "cuda" else "")}}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"quant-{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}.json/.md in {report['seconds']} s")
    print(f"on a GPU: {GPU_COMMAND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
