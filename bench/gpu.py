"""GPU benchmark: qvl_ros against transformers on the same random Qwen2.5-VL-3B-size weights.

    python3 bench/gpu.py                                   # CUDA, bf16, 3B dimensions
    python3 bench/gpu.py --quick                           # the short run of scripts/gpu_check.sh
    python3 bench/gpu.py --device cpu --config tiny        # the same rows on tiny dimensions

Writes the checkpoint itself (weights drawn on the device, the tiny tokenizer and its special-token
ids), then measures side by side in one process, most telling rows first: the warm-up time, one
decode step (batch 1, 4, 8) against its roofline (decoder weight bytes plus the KV-cache bytes
of the filled columns, over the device's HBM bandwidth), 32-token captions (uint8 frames to text),
encode (1 x 3 and 4 x 3 cameras of 448², uint8 frames in), the vision tower (12 and 32 frames of
448²) against the device's peak bf16 rate, the same decoder in 4 bits (AWQ's grid at group size
128: weight bytes, decode step, caption; against our bf16 rows), and the low-precision error of
both against transformers in float32. transformers runs with attn_implementation="sdpa".

The JSON is written again after every row (to a temporary file, then renamed: a run cut short
leaves every finished row and never half of one), with the targets evaluated on the rows so far.
`--quick`: fewer repetitions, no 32-frame row, and the float32 reference of the error rows on the
`small` config instead of the 3B one (a 3B model in float32 is minutes of loading). Targets are
stated for an H200 and scaled to the device found: by HBM bandwidth for decoding, by peak bf16
FLOP/s for vision (vendors' figures for known devices by name, else this run's measured copy
bandwidth and matmul rate). Results go to `<out>/gpu-<device>.{json,md}`. Imports only torch,
transformers, safetensors, numpy and qvl_ros.model: it runs without ROS and without network.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path



def _require_python() -> None:
    """Stop with one line naming what is missing when this Python cannot run the benchmark."""
    if sys.version_info < (3, 10):
        sys.exit(f"bench/gpu.py needs Python >= 3.10 with torch, transformers, safetensors and numpy; "
                 f"{sys.executable} is {platform.python_version()}")
    import importlib.util

    missing = []
    for mod in ("torch", "transformers", "safetensors", "numpy"):
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # ValueError: blocked in sys.modules
            found = False
        if not found:
            missing.append(mod)
    if missing:
        sys.exit(f"bench/gpu.py needs torch, transformers, safetensors and numpy in {sys.executable}; "
                 f"missing: {', '.join(missing)}")


_require_python()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python3 bench/gpu.py` from a checkout

from bench.precision import low_precision_errors, reference_class  # noqa: E402
from qvl_ros.model import PRESETS, BatchedQwenVL, QwenVLConfig, save_tiny_checkpoint  # noqa: E402
from qvl_ros.model.quant import quantize_decoder_int4, weight_bytes  # noqa: E402

PROMPTS = ["Describe the scene.", "What is in front of the robot?", "Is the path clear?", "Count the people."]
TINY_IDS = {k: getattr(PRESETS["tiny"], k) for k in
            ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}

# HBM bytes/s and dense bf16 FLOP/s from the vendors' data sheets, by a pattern of the device name
# (first match wins: GH200 before H200, the H100 variants before the SXM one, L40S before L4)
DEVICE_SPECS = (
    (r"GH200", 4.0e12, 989e12), (r"H200", 4.8e12, 989e12),
    (r"H100.*NVL", 3.9e12, 835e12), (r"H100.*PCIe", 2.0e12, 756e12), (r"H100", 3.35e12, 989e12),
    (r"A100.*80GB", 2.039e12, 312e12), (r"A100", 1.555e12, 312e12),
    (r"L40S", 0.864e12, 362e12), (r"\bL4\b", 0.3e12, 121e12), (r"A10G", 0.6e12, 125e12),
)
H200 = (4.8e12, 989e12)  # the device the targets are stated for


def device_spec(name: str, measured_bandwidth: float, measured_flops: float) -> dict:
    """{"bandwidth", "flops", "source"}: the data-sheet figures of a known device, else the measured ones."""
    for pattern, bw, flops in DEVICE_SPECS:
        if re.search(pattern, name):
            return {"bandwidth": bw, "flops": flops, "source": f"data sheet ({pattern.strip(chr(92) + 'b')})"}
    return {"bandwidth": measured_bandwidth, "flops": measured_flops, "source": "measured in this run"}


# ----------------------------------------------------------------------------- measurement
class Clock:
    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, reps: int | None = None) -> float:
        """Median seconds of fn() after one warm-up call."""
        fn()
        times = []
        for _ in range(reps or self.reps):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def peak_mb(self, fn) -> float | None:
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2 ** 20


def kernels_per_call(fn, device: torch.device, before=None) -> int:
    """Device kernels launched by one call (CUDA), or operator calls on the CPU; `before()` (not
    counted) runs ahead of each call."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    before = before or (lambda: None)
    before()
    fn()
    before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)


def matmul_rate(device, dtype, n: int, seconds: float) -> float:
    """FLOP/s of an n x n matmul in dtype on device."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(torch.device(device), 1)
    once = clock(lambda: a @ b)
    reps = max(3, int(seconds / max(once, 1e-6)))
    return 2 * n ** 3 / clock(lambda: a @ b, reps)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s moved by a device-to-device copy (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = Clock(torch.device(device), 10)(lambda: dst.copy_(src))
    return 2 * nbytes / t


def vision_flops(model: BatchedQwenVL, grids) -> float:
    """2 x multiply-adds of the vision tower on these grids (patch embedding without the temporal
    repeat, which the reference computes twice)."""
    c = model.cfg
    D, I, mm = c.vision_hidden, c.vision_intermediate, c.merge_size ** 2
    lay = model.visual.layout(grids)
    S = sum(g[1] * g[2] for g in grids)
    lin = 2 * S * (D * 3 * D + D * D + D * (2 * I if c.is_v25 else I) + I * D)
    seg = lambda groups: sum(g.n * g.length * g.length for g in groups)
    attn_w, attn_f = 4 * seg(lay.window_groups) * D, 4 * seg(lay.full_groups) * D
    full = set(c.fullatt_blocks)
    total = sum(lin + (attn_f if i in full else attn_w) for i in range(c.vision_depth))
    total += 2 * S * 3 * c.patch_size ** 2 * D + 2 * (S // mm) * (mm * D * mm * D + mm * D * c.vision_out)
    return float(total)


def decoder_step_bytes(model: BatchedQwenVL) -> int:
    """Weight bytes one decode step reads: every decoder layer (4-bit weights at their packed size)
    and the output projection."""
    d = model.decoder
    head = (d.embed.weight if d.lm_head is None else d.lm_head.weight)
    return weight_bytes(d.layers) + head.numel() * head.element_size()


def kv_read_bytes(model: BatchedQwenVL, B: int, columns: float) -> float:
    """KV-cache bytes one decode step must read: keys and values of `columns` filled positions for B
    rows in every layer (the step of decoding.py reads its whole bucket; this is the least)."""
    c = model.cfg
    return 2.0 * c.layers * B * c.kv_heads * columns * c.head_dim * model.dtype.itemsize


# ----------------------------------------------------------------------------- set-up
def write_checkpoint(path: Path, config: str, device, dtype) -> Path:
    cfg = QwenVLConfig.preset(config, **({} if config.startswith("tiny") or config == "small" else TINY_IDS))
    return save_tiny_checkpoint(path, config=cfg, seed=0, device=device, dtype=dtype)


def frames(B: int, N: int, size=(448, 448), seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g) for _ in range(N)] for _ in range(B)]


class GpuBench:
    def __init__(self, a):
        from transformers import AutoProcessor

        self.a = a
        self.size = (a.size, a.size)
        self.size_name = f"{a.size}x{a.size}"
        self.device = torch.device(a.device)
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
        self.clock = Clock(self.device, a.reps)
        self.dir = Path(tempfile.mkdtemp(prefix="qvl_gpu_bench_"))
        t = time.perf_counter()
        self.path = write_checkpoint(self.dir / "ckpt", a.config, self.device, self.dtype)
        self.checkpoint_s = time.perf_counter() - t
        print(f"checkpoint {a.config} written in {self.checkpoint_s:.1f} s", flush=True)
        self.rows: list[dict] = []
        self.extra: dict = {"checkpoint_s": self.checkpoint_s}
        self.t0 = time.perf_counter()
        self.stem = Path(a.out) / f"gpu-{slug(machine(self.device)['device'])}"
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.save()  # no rows yet: the machine, the options and the checkpoint time
        t = time.perf_counter()
        self.ours = BatchedQwenVL.from_pretrained(self.path, device=self.device, dtype=self.dtype)
        self.ref = reference_class(self.path).from_pretrained(str(self.path), dtype=self.dtype,
                                                              attn_implementation="sdpa").to(self.device).eval()
        self.extra["load_s"] = time.perf_counter() - t
        self.proc = AutoProcessor.from_pretrained(str(self.path))
        self.proc.tokenizer.padding_side = "left"

    def report(self) -> dict:
        rep = {"machine": machine(self.device), "config": self.a.config, "dtype": self.a.dtype,
               "quick": self.a.quick, "rows": self.rows, "measures": self.extra,
               "checkpoint_s": self.checkpoint_s, "wall_s": time.perf_counter() - self.t0}
        rep["targets"] = targets(rep)
        return rep

    def save(self) -> dict:
        """The report so far, written to a temporary file and renamed over the JSON (and the .md)."""
        rep = self.report()
        for suffix, text in ((".json", json.dumps(rep, indent=2)), (".md", markdown(rep))):
            final = self.stem.with_suffix(suffix)
            tmp = final.with_name(f".{final.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, final)
        return rep

    def add(self, name, params, ours, ref, unit="ms", **extra):
        ratio = ref / ours if ours and ref else None
        row = {"name": name, "params": params, "ours": ours, "reference": ref, "unit": unit, "ratio": ratio,
               "device": str(self.device), "dtype": self.a.dtype, **extra}
        self.rows.append(row)
        r = f"{ratio:.2f}x" if ratio else "-"
        print(f"  {name:22s} {json.dumps(params):40s} ours {ours:10.3f} ref {ref if ref is None else round(ref, 3)!s:>10} "
              f"{unit:6s} {r:>7s}", flush=True)
        self.save()
        return row

    def hf_inputs(self, imgs, prompts):
        texts = [self.proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * len(c) + [{"type": "text", "text": p}]}],
            add_generation_prompt=True, tokenize=False) for c, p in zip(imgs, prompts)]
        flat = [im.permute(1, 2, 0).numpy() for cams in imgs for im in cams]
        inp = self.proc(text=texts, images=flat, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in inp.items()}

    # ------------------------------------------------------------------ rows
    def warmup(self):
        sizes = [self.size] * 3
        t = self.ours.warmup(sizes, batch_sizes=(1, 4), max_new_tokens=32, compile_vision=self.a.compile)
        self.extra["warmup_s"] = t
        self.add("warmup", {"sizes": f"3 x {self.size_name}", "batch_sizes": [1, 4],
                            "compile_vision": self.ours.visual.compiled}, t, None, "s",
                 graphs=self.ours.steps.captures, compile_failures=[e for _, e in self.ours.visual.compile_failures])

    @torch.inference_mode()
    def vision(self, peak: float):
        for n in (12,) if self.a.quick else (12, 32):
            imgs = frames(1, n, self.size, seed=n)
            _, batch = self.ours.prepare(imgs, ["x"])
            pix = batch.pixels.to(self.dtype)
            hf = self.hf_inputs([[im] for im in imgs[0]], ["x"] * n)
            hpix, hgrid = hf["pixel_values"].to(self.dtype), hf["image_grid_thw"]
            f_ours = lambda: self.ours.visual(pix, batch.grids)
            f_ref = lambda: self.ref.model.visual(hpix, grid_thw=hgrid)
            to, tr = self.clock(f_ours), self.clock(f_ref)
            flops = vision_flops(self.ours, batch.grids)
            row = self.add("vision", {"frames": n, "size": self.size_name}, to * 1e3, tr * 1e3,
                           tflops=flops / to / 1e12, peak_fraction=flops / to / peak,
                           peak_mem_mb={"ours": self.clock.peak_mb(f_ours), "reference": self.clock.peak_mb(f_ref)})
            if n == 12:
                row["kernels"] = {"ours": kernels_per_call(f_ours, self.device),
                                  "reference": kernels_per_call(f_ref, self.device)}
                if self.ours.visual.compiled:  # the same tower without torch.compile
                    self.ours.visual.compile_blocks(False)
                    self.add("vision (eager blocks)", {"frames": n, "size": self.size_name}, self.clock(f_ours) * 1e3, tr * 1e3,
                             kernels={"ours": kernels_per_call(f_ours, self.device)})
                    self.ours.visual.compile_blocks(True)

    @torch.inference_mode()
    def encode(self):
        for B, N in ((1, 3), (4, 3)):
            imgs = frames(B, N, self.size, seed=B * 10 + N)
            dev_imgs = [[im.to(self.device) for im in cams] for cams in imgs]
            prompts = [PROMPTS[b % 4] for b in range(B)]
            f_ours = lambda: self.ours.encode(dev_imgs, prompts)
            f_ref = lambda: self.ref.model(**self.hf_inputs(imgs, prompts))
            self.add("encode", {"B": B, "N": N, "size": self.size_name, "reference": "HF processor + model, batched"},
                     self.clock(f_ours) * 1e3, self.clock(f_ref) * 1e3,
                     peak_mem_mb={"ours": self.clock.peak_mb(f_ours), "reference": self.clock.peak_mb(f_ref)})

    @torch.inference_mode()
    def decode_step(self, bandwidth: float, model: BatchedQwenVL | None = None, name: str = "decode step",
                    batches=(1, 4, 8), reference: dict | None = None) -> dict:
        """Seconds per token of `--steps` steps from the prompt's end (the cache holds prompt + steps)
        by batch size, each a row with its roofline: (decoder weights + KV reads of the filled
        columns) / `bandwidth`. Reference: transformers' generate, or `reference` {B: seconds}."""
        model = model or self.ours
        weight = decoder_step_bytes(model)
        n, out = self.a.steps, {}
        for B in batches:
            imgs = frames(B, 3, self.size, seed=B)
            prompts = [PROMPTS[b % 4] for b in range(B)]
            _, batch = model.prepare(imgs, prompts)
            L = batch.input_ids.shape[1]
            state, step = model.steps.get(B, L + n + 1)  # room for every step of a timed call
            state.begin(batch.attention_mask, batch.next_position)
            state.tok.fill_(100)

            def f_ours():
                state.cache_pos.fill_(L)
                state.position[:B] = batch.next_position
                for _ in range(n):
                    step()
            to = self.clock(f_ours) / n
            kv = kv_read_bytes(model, B, L + (n - 1) / 2)  # mean filled columns over the steps
            roofline = (weight + kv) / bandwidth
            tr, label = (reference or {}).get(B), f"ours {self.a.dtype}"
            if reference is None:
                label = "HF generate, per token"
                hf = self.hf_inputs(imgs, prompts)
                gen = lambda k: self.ref.generate(**hf, max_new_tokens=k, min_new_tokens=k, do_sample=False)
                tr = (self.clock(lambda: gen(1 + n)) - self.clock(lambda: gen(1))) / n
                tr = tr if tr > 0 else None  # a difference of two timings: lost in noise on a busy host
            out[B] = to
            self.add(name, {"B": B, "N": 3, "size": self.size_name, "cache": state.capacity[1], "steps": n,
                            "graphs": self.device.type == "cuda",
                            "reference": label},
                     to * 1e3, tr and tr * 1e3, roofline_ms=roofline * 1e3, roofline_fraction=roofline / to,
                     weight_bytes=weight, kv_read_bytes=kv,
                     kernels={"ours": kernels_per_call(step, self.device, lambda: state.cache_pos.fill_(L))}
                     if B == 1 else None)
        return out

    @torch.inference_mode()
    def caption(self):
        eos = self.ours.eos_ids
        for B, N in ((1, 3), (4, 3)):
            imgs = frames(B, N, self.size, seed=100 + B)
            dev_imgs = [[im.to(self.device) for im in cams] for cams in imgs]
            prompts = [PROMPTS[b % 4] for b in range(B)]

            def f_ref():
                inp = self.hf_inputs(imgs, prompts)
                out = self.ref.generate(**inp, max_new_tokens=32, min_new_tokens=32, do_sample=False)
                return self.proc.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)

            self.ours.eos_ids = []  # 32 tokens on both sides: no early stop
            try:
                f_ours = lambda: self.ours.generate(dev_imgs, prompts, max_new_tokens=32)
                to, tr = self.clock(f_ours), self.clock(f_ref)
                ids = self.ours.generate_ids(dev_imgs, prompts, max_new_tokens=32).cpu()
                peak = {"ours": self.clock.peak_mb(f_ours), "reference": self.clock.peak_mb(f_ref)}
            finally:
                self.ours.eos_ids = eos
            inp = self.hf_inputs(imgs, prompts)
            ref_ids = self.ref.generate(**inp, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            ref_ids = ref_ids[:, inp["input_ids"].shape[1]:].cpu()
            agree = (ids == ref_ids).float().mean().item()
            self.add("caption", {"B": B, "N": N, "new_tokens": 32, "size": self.size_name, "from": "uint8 frames to text"},
                     to * 1e3, tr * 1e3, token_agreement=agree, peak_mem_mb=peak)

    @torch.inference_mode()
    def int4(self, bandwidth: float, bf16_steps: dict):
        """The decoder in 4 bits (AWQ's round-to-nearest grid, group 128, torch's int4 kernels) on
        the same weights: decoder weight bytes, decode step and a 32-token caption, against ours in
        the run's dtype (reference column)."""
        q = BatchedQwenVL.from_pretrained(self.path, device=self.device, dtype=self.dtype)
        q.visual.compile_blocks(self.ours.visual.compiled)  # the same vision tower as the bf16 rows
        dense = weight_bytes(q.decoder.layers)
        t = time.perf_counter()
        quantize_decoder_int4(q.decoder, group_size=128)
        self.sync()
        self.add("int4 weights", {"method": "awq", "group_size": 128, "what": "decoder layers"},
                 weight_bytes(q.decoder.layers) / 2 ** 20, dense / 2 ** 20, "MiB",
                 fraction=weight_bytes(q.decoder.layers) / dense, quantize_s=time.perf_counter() - t)
        self.decode_step(bandwidth, q, "int4 decode step", (1, 8), reference=bf16_steps)
        imgs = [[im.to(self.device) for im in cams] for cams in frames(1, 3, self.size, seed=101)]
        q.eos_ids, self.ours.eos_ids, eos = [], [], self.ours.eos_ids
        try:
            t4 = self.clock(lambda: q.generate(imgs, [PROMPTS[0]], max_new_tokens=32))
            tb = self.clock(lambda: self.ours.generate(imgs, [PROMPTS[0]], max_new_tokens=32))
        finally:
            self.ours.eos_ids = eos
        self.add("int4 caption", {"B": 1, "N": 3, "new_tokens": 32, "size": self.size_name,
                                  "reference": f"ours {self.a.dtype}"}, t4 * 1e3, tb * 1e3)
        del q

    def sync(self):
        self.clock.sync()

    def precision(self):
        """bf16 error of both against transformers in float32. --quick: on the `small` config (a
        checkpoint of its own) where the run's config is a released size."""
        g = torch.Generator().manual_seed(3)
        cams = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g) for _ in range(3)]
        config, path, models = self.a.config, self.path, {"ref": self.ref, "ours": self.ours}
        if self.a.quick and config not in ("tiny", "tiny-qwen2-vl", "small"):
            config, models = "small", {}
            path = write_checkpoint(self.dir / "small", config, self.device, torch.float32)
        err = low_precision_errors(path, cams, device=self.device, dtype=self.dtype, models=models)
        self.extra["low_precision_error"] = err
        for part in ("vision", "hidden"):
            self.add(f"{self.a.dtype} error {part}", {"cameras": "3 x 640x480", "against": "transformers float32",
                                                      "config": config},
                     err["ours"][part], err["transformers"][part], "rel")

    # ------------------------------------------------------------------ all
    def run(self) -> dict:
        dev = self.device
        self.warmup()
        mm_n = 8192 if dev.type == "cuda" else 512
        peak = matmul_rate(dev, self.dtype, mm_n, 1.0 if dev.type == "cuda" else 0.3)
        copy = copy_bandwidth(dev, (2 << 30) if dev.type == "cuda" else (64 << 20))
        spec = device_spec(machine(dev)["device"], copy, peak)
        self.extra.update(matmul_flops=peak, matmul_n=mm_n, copy_bandwidth=copy, spec=spec)
        print(f"matmul {mm_n}² {self.a.dtype}: {peak / 1e12:.1f} TFLOP/s; copy bandwidth {copy / 1e9:.0f} GB/s; "
              f"targets from {spec['source']}: {spec['bandwidth'] / 1e9:.0f} GB/s, {spec['flops'] / 1e12:.0f} TFLOP/s",
              flush=True)
        self.save()
        steps = self.decode_step(spec["bandwidth"])
        self.caption()
        self.encode()
        self.vision(spec["flops"])
        self.int4(spec["bandwidth"], steps)
        self.precision()
        return self.save()


def machine(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "platform": platform.platform()}


# ----------------------------------------------------------------------------- targets and report
def find(report, name, **params) -> dict | None:
    return next((r for r in report["rows"] if r["name"] == name
                 and all(r["params"].get(k) == v for k, v in params.items())), None)


def targets(report: dict) -> list[dict]:
    """The targets of the GPU work (bf16, 3B dimensions), stated for an H200 and scaled to this
    device (`measures.spec`): decoding limits by HBM bandwidth, vision and encode limits by peak
    bf16 FLOP/s. Rows not measured (yet, or at another frame size) leave a target unmeasured (None)."""
    out = []
    spec = report["measures"].get("spec")
    mem = H200[0] / spec["bandwidth"] if spec else 1.0  # > 1 on a device slower than an H200
    comp = H200[1] / spec["flops"] if spec else 1.0
    where = f" (H200 limit x {mem:.2f} for bandwidth)" if spec and mem != 1 else ""
    where_c = f" (H200 limit x {comp:.2f} for bf16 FLOP/s)" if spec and comp != 1 else ""

    def target(text, row, value, limit, ok):
        out.append({"target": text, "measured": None if row is None else value, "limit": limit,
                    "met": None if row is None else bool(ok)})

    for B, h200 in ((1, 2.6), (8, 3.5)):
        r, limit = find(report, "decode step", B=B, size="448x448"), round(h200 * mem, 3)
        target(f"decode step at batch {B} <= {limit} ms{where}", r, r and r["ours"], limit, r and r["ours"] <= limit)
        target(f"decode step at batch {B} >= 50% of its roofline (weights + KV reads)", r,
               r and r["roofline_fraction"], 0.5, r and r["roofline_fraction"] >= 0.5)
    r, limit = find(report, "caption", B=1, N=3, size="448x448"), round(150 * mem, 1)
    target(f"32-token caption, 1 x 3 cameras of 448², uint8 frames to text <= {limit} ms{where}", r,
           r and r["ours"], limit, r and r["ours"] <= limit)
    r, limit = find(report, "vision", frames=12, size="448x448"), round(32 * comp, 2)
    target(f"vision tower, 12 x 448² <= {limit} ms{where_c}", r, r and r["ours"], limit, r and r["ours"] <= limit)
    target("vision tower, 12 x 448² >= 10x transformers", r, r and r["ratio"], 10, r and (r["ratio"] or 0) >= 10)
    r, limit = find(report, "encode", B=1, N=3, size="448x448"), round(25 * comp, 2)
    target(f"encode, 1 x 3 cameras of 448² <= {limit} ms{where_c}", r, r and r["ours"], limit,
           r and r["ours"] <= limit)
    r = find(report, "int4 weights")
    target("int4 decoder weights <= 30% of bf16", r, r and r["fraction"], 0.3, r and r["fraction"] <= 0.3)
    r = find(report, "int4 decode step", B=1, size="448x448")
    target("int4 decode step at batch 1 faster than bf16", r, r and r["ratio"], 1, r and (r["ratio"] or 0) > 1)
    for part in ("vision", "hidden"):
        r = next((x for x in report["rows"] if x["name"].endswith(f"error {part}")), None)
        target(f"{report['dtype']} error, {part}, <= transformers' {report['dtype']} error", r, r and r["ours"],
               r and r["reference"], r and r["ours"] <= r["reference"])
    r = find(report, "warmup", sizes="3 x 448x448")
    target("warmup for the node's sizes (3 x 448², batch 1 and 4) <= 60 s, once per process", r, r and r["ours"], 60,
           r and r["ours"] <= 60)
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU benchmark: {m['device']}", "",
             f"Config `{report['config']}`, {report['dtype']}, random weights; torch {m['torch']}, "
             f"transformers {m['transformers']}, CUDA {m['cuda']}. qvl_ros against transformers "
             "(attn_implementation=\"sdpa\") on the same weights and inputs; times are medians.", "",
             "| row | params | qvl_ros | transformers | unit | ratio | notes |", "|---|---|---|---|---|---|---|"]
    skip = {"name", "params", "ours", "reference", "unit", "ratio", "device", "dtype"}
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    for r in report["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        notes = "; ".join(f"{k} {json.dumps(v) if isinstance(v, dict) else fmt(v)}" for k, v in r.items()
                          if k not in skip and v is not None)
        ratio = f"**{r['ratio']:.2f}×**" if r["ratio"] else "-"
        lines.append(f"| {r['name']} | {params} | {fmt(r['ours'])} | {fmt(r['reference'])} | {r['unit']} | {ratio} | {notes} |")
    ms = report["measures"]
    if "spec" in ms:
        lines += ["", f"Measured: {ms['matmul_n']}² matmul {ms['matmul_flops'] / 1e12:.1f} TFLOP/s, device copy "
                  f"{ms['copy_bandwidth'] / 1e9:.0f} GB/s. Targets and rooflines from {ms['spec']['source']}: "
                  f"{ms['spec']['bandwidth'] / 1e9:.0f} GB/s, {ms['spec']['flops'] / 1e12:.0f} TFLOP/s bf16."]
    if report.get("quick"):
        lines += ["", "Quick run (`--quick`): fewer repetitions, no 32-frame row, error rows on the small config "
                  "where the run's config is a released size."]
    lines += ["", "## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {fmt(t['measured'])} | {fmt(t['limit'])} | {met} |")
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="qwen2.5-vl-3b", help="preset: qwen2.5-vl-3b (default), small, tiny")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA), float16, float32")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5 on CUDA, 2 on CPU; --quick 3, 1)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per timed call (default 16 on CUDA, 4 on CPU)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="torch.compile the vision blocks (default on CUDA)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--size", type=int, default=448, help="camera frame side in pixels (448; try 112 on a CPU)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results directory")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions, no 32-frame row, float32 reference on the small config only")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --config tiny to try the rows on the CPU", file=sys.stderr)
        return 2
    a.dtype = a.dtype or "bfloat16"
    a.reps = a.reps or ((3 if a.quick else 5) if cuda else (1 if a.quick else 2))
    a.steps = a.steps or (16 if cuda else 4)
    torch.manual_seed(0)
    bench = GpuBench(a)
    report = bench.run()
    print(markdown(report))
    print(f"wrote {bench.stem}.json and {bench.stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
