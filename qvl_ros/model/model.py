"""BatchedQwenVL: Qwen2.5-VL / Qwen2-VL over B samples x N cameras in one call.

    model = BatchedQwenVL.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    feats = model.encode(frames, prompts)       # frames: uint8 (B, N, 3, H, W) or nested lists
    texts = model.generate(frames, prompts, max_new_tokens=32)
    feats = model.encode([[clip, image]], prompts, fps=10)   # clip: uint8 (T, 3, H, W)

Everything between the uint8 frames and the returned tensors stays on the model device; the only
host work is index math known from image sizes and the tokenizer.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_weights, read_tensors, resolve_checkpoint
from .decode_control import DecodeControl
from .config import QwenVLConfig, check_pixel_bounds, load_checked_config
from .inputs import check_fps, check_images  # noqa: F401  (check_images: part of this module's interface)
from .processor import Batch, TensorProcessor
from .token_steps import StepRunner
from .quant import QuantConfig, attach_int4_linears, int4_tensor_names, split_checkpoint
from .text import TextModel
from .vision import VisionTower
from .weights_check import check_checkpoint_files, check_finite as check_finite_weights


@dataclass
class Features:
    vision: list          # [B][N] tensors (tokens_n, D): merged vision tokens of each camera (t*h*w/4 for a clip)
    hidden: torch.Tensor  # (B, L, D) decoder last hidden state after the final norm, left padded (pads zeroed)
    attention_mask: torch.Tensor  # (B, L)
    input_ids: torch.Tensor       # (B, L)


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype, device: torch.device, config_dtype: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config_dtype or "", torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return DTYPES[dtype]


class BatchedQwenVL(nn.Module):
    def __init__(self, cfg: QwenVLConfig, processor: TensorProcessor, eos_ids=(), pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.processor = processor
        self.visual = VisionTower(cfg)
        self.decoder = TextModel(cfg)
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.name = ""
        self.steps = StepRunner(self.decoder)  # decode states / CUDA graphs per bucket

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed.weight.dtype

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, min_pixels=None, max_pixels=None,
                        video_min_pixels=None, video_max_pixels=None, dequantize=False,
                        int4_dtype=torch.bfloat16, check_finite=True):
        """Load a Qwen2.5-VL or Qwen2-VL checkpoint (safetensors only, no remote code): a directory,
        or a Hugging Face id ("Qwen/Qwen2.5-VL-3B-Instruct") already in the local cache, which is
        never downloaded (as the node's `model.path`).

        Pixel bounds default to the checkpoint's processor config: min/max_pixels for still
        images, video_min/max_pixels for each frame of a clip. 4-bit AWQ / GPTQ checkpoints
        (quant.py) run their decoder linears on torch's int4 kernels, computing in `int4_dtype`
        (bfloat16: the CUDA kernel's only dtype and the CPU kernel's fast one; float32 on the CPU
        is exact to float32 rounding but slower than float weights); `dequantize=True` loads them
        as float weights of `dtype` instead. Config sizes, pixel bounds and weight files are
        checked before anything is allocated (config.py, weights_check.py); weights holding NaN
        or Inf are refused unless `check_finite=False`."""
        path = Path(path) if Path(path).is_dir() else resolve_checkpoint(path)
        raw, cfg = load_checked_config(path)  # bounded and consistent, before transformers parses it
        check_checkpoint_files(path)
        qcfg = QuantConfig.from_checkpoint(raw, path)  # None for float checkpoints; refuses unknown formats
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, device, raw.get("torch_dtype") or raw.get("dtype"))
        proc = TensorProcessor.from_pretrained(path, cfg, device=device, min_pixels=min_pixels,
                                               max_pixels=max_pixels, video_min_pixels=video_min_pixels,
                                               video_max_pixels=video_max_pixels)
        check_pixel_bounds(cfg, proc, dtype, device)
        eos = []
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            e = json.loads(gen_path.read_text()).get("eos_token_id")
            eos = e if isinstance(e, list) else ([e] if e is not None else [])
        if not eos and proc.tokenizer.eos_token_id is not None:
            eos = [proc.tokenizer.eos_token_id]
        tensors, int4 = read_tensors(path), {}
        if check_finite:
            check_finite_weights(tensors, path)
        if qcfg is not None:
            tensors, int4 = split_checkpoint(tensors, qcfg, cfg, path, dequantize)
        weights = check_weights(tensors, cfg, path, absent=int4_tensor_names(int4))
        with torch.device("meta"):
            model = cls(cfg, proc, eos_ids=eos, pad_id=proc.pad_id)
        for i, name in int4:  # 4-bit linears: attached on the device below, never allocated in float
            setattr(model.decoder.layers[i], name, None)
        model = model.to_empty(device="cpu")
        model.visual.load(weights)
        model.decoder.load(weights)
        del weights, tensors
        if dtype == torch.float32:
            model.visual.fold_norms()
        # buffers are computed, not stored in the checkpoint; rotary frequencies stay float32 (_apply)
        model = model.to(device=device, dtype=dtype)
        attach_int4_linears(model.decoder, int4, device, dtype, int4_dtype)
        model.name = str(path)
        return model.eval().requires_grad_(False)

    @torch.inference_mode()
    def warmup(self, sizes, batch_sizes=(1,), prompt: str = "Describe the scene.", max_new_tokens: int = 32,
               compile_vision: bool | None = None) -> float:
        """Pay one-time costs before the first frame; returns the seconds it took.

        `sizes`: one (H, W) per camera, as the frames will arrive; `batch_sizes`: the batch sizes
        that will run (`token_steps.warmup_batch_sizes(max_size)` covers every decode bucket up to a largest
        batch). For each, one encode + caption on blank frames builds the vision layout cache and,
        on CUDA, captures the decode step's CUDA graph for its (batch, cache length) bucket and
        (with `compile_vision`, default: on CUDA) compiles the vision blocks for that layout. A
        layout that fails to compile runs eagerly (warned with its grids, counted in
        `visual.compile_failures`); any other error propagates. Captures made here are not
        counted in `late_captures`."""
        import time

        t0 = time.perf_counter()
        if compile_vision is None:
            compile_vision = self.device.type == "cuda"
        if compile_vision:
            self.visual.compile_blocks()
        self.steps.warming = True
        try:
            for b in batch_sizes:
                frames = [[torch.zeros(3, h, w, dtype=torch.uint8, device=self.device) for h, w in sizes]
                          for _ in range(b)]
                self._run(frames, [prompt] * b, None, max_new_tokens)
        finally:
            self.steps.warming = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @property
    def late_captures(self) -> int:
        """CUDA graphs captured outside `warmup` (a node expects 0 once it is active)."""
        return self.steps.late_captures

    # ------------------------------------------------------------------ pieces
    def prepare(self, images, prompts, size=None, fps=None) -> tuple[list, Batch]:
        batch = check_images(images, prompts)
        return batch, self.processor(batch, list(prompts), size=size, fps=check_fps(fps, batch))

    def vision_features(self, inputs: Batch) -> torch.Tensor:
        """(total merged tokens, D) for all images and clips of the batch, in input order."""
        clip_pixels = None if inputs.clip_pixels is None else inputs.clip_pixels.to(self.dtype)
        return self.visual(inputs.pixels.to(self.dtype), inputs.grids, clip_pixels, inputs.clips)

    def embed(self, inputs: Batch, vis: torch.Tensor) -> torch.Tensor:
        x = self.decoder.embed(inputs.input_ids)  # (B, L, D)
        mask = inputs.input_ids == self.cfg.image_token_id
        if inputs.clips is not None:
            mask |= inputs.input_ids == self.cfg.video_token_id
        return x.masked_scatter(mask.unsqueeze(-1), vis.to(x.dtype))  # mask (B, L, 1)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def encode(self, images, prompts, size=None, fps=None) -> Features:
        """Vision tokens per camera and decoder last hidden states for B samples x N cameras.

        A camera entry is a uint8 (3, H, W) image or a (T, 3, H, W) clip (oldest frame first);
        `fps`: the clips' frame rate, one number, one per sample or a list per sample's cameras."""
        return self._run(images, prompts, size, 0, fps=fps)[0]

    @torch.inference_mode()
    def generate_ids(self, images, prompts, max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, size=None,
                     generator: torch.Generator | None = None, fps=None,
                     control: DecodeControl | None = None) -> torch.Tensor:
        """(B, max_new_tokens) generated token ids; after a row's end token the row holds pad ids.
        `control` (decode_control.DecodeControl): stop between two decode steps (the rows then
        hold the tokens generated so far, pad ids after) and follow the tokens every chunk."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        return self._run(images, prompts, size, max_new_tokens, do_sample, temperature, top_p, generator, fps,
                         control=control)[1]

    def generate(self, images, prompts, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, size=None,
                 generator: torch.Generator | None = None, fps=None,
                 control: DecodeControl | None = None) -> list[str]:
        """Batched generation with a KV cache; each row stops at its own end token (or, with a
        stopped `control`, where it was stopped: see generate_ids)."""
        ids = self.generate_ids(images, prompts, max_new_tokens, do_sample, temperature, top_p, size, generator, fps,
                                control)
        return self.detokenize(ids)

    @torch.inference_mode()
    def encode_generate(self, images, prompts, max_new_tokens: int = 32, do_sample: bool = False,
                        temperature: float = 1.0, top_p: float = 1.0, size=None,
                        generator: torch.Generator | None = None, fps=None,
                        control: DecodeControl | None = None) -> tuple[Features, list[str]]:
        """Features and captions from one vision pass and one prefill (`control`: as generate_ids;
        the features are complete either way)."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        feats, ids = self._run(images, prompts, size, max_new_tokens, do_sample, temperature, top_p, generator, fps,
                               control=control)
        return feats, self.detokenize(ids)

    def detect(self, images, classes_or_query, **options) -> list:
        """Open-vocabulary detections per sample and camera, in each camera's own pixels.

        `classes_or_query`: a list of class names or one free-text query (or one per sample);
        options: see grounding.detect (constrained, kind, max_detections, size, ...)."""
        from .grounding import detect

        return detect(self, images, classes_or_query, **options)

    def detokenize(self, ids: torch.Tensor) -> list[str]:
        """Generated token ids (B, T) -> one text per row, special tokens dropped."""
        return self.processor.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The old name of :meth:`detokenize`."""
        warnings.warn("BatchedQwenVL.decode is now detokenize", DeprecationWarning, stacklevel=2)
        return self.detokenize(ids)

    def _run(self, images, prompts, size, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, generator=None, fps=None, hook=None,
             control: DecodeControl | None = None):
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")
        _, inputs = self.prepare(images, prompts, size, fps)
        B, L = inputs.input_ids.shape
        state = step = None
        if max_new_tokens:
            private = control is not None and control.private_state
            state, step = self.steps.get(B, L + max_new_tokens, private=private)
        vis = self.vision_features(inputs)
        pads = [L - n for n in inputs.lengths]
        padded = any(pads)
        hidden = self.decoder(self.embed(inputs, vis), inputs.position_ids, inputs.attention_mask, pads,
                              state.prefill_caches(B) if state else None)
        counts = [g[0] * g[1] * g[2] // self.cfg.merge_size ** 2 for g in inputs.grids]
        per_image = vis.split(counts)
        out, k = [], 0
        for n in inputs.images_per_sample:
            out.append(list(per_image[k:k + n]))
            k += n
        masked = hidden * inputs.attention_mask.unsqueeze(-1).to(hidden.dtype) if padded else hidden
        feats = Features(out, masked, inputs.attention_mask, inputs.input_ids)
        if not max_new_tokens:
            return feats, None
        state.begin(inputs.attention_mask, inputs.next_position)
        logits = self.decoder.logits(hidden[:, -1])  # (B, V)
        return feats, self._generate_tokens(logits, state, step, max_new_tokens, do_sample, temperature, top_p, generator,
                                            hook, control)

    def _generate_tokens(self, logits, state, step, max_new_tokens, do_sample, temperature, top_p, generator, hook=None,
                         control=None):
        """Token loop: select, record, feed back. Host syncs only every chunk (8 tokens, or the
        control's chunk): are all rows done?

        `hook` (constrained.GrammarGuide / TokenScores): `before(logits, done)` returns the logits
        to select from (e.g. masked by a grammar), `after(t, tok, done)` sees each step's tokens.
        `control` (DecodeControl): its stop flag is read before every step (no sync); at each
        chunk boundary it gets the tokens so far (`chunk_done`)."""
        B, dev = logits.shape[0], logits.device
        eos = torch.tensor(self.eos_ids or [-1], device=dev)
        ids = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        pad = torch.full((B,), self.pad_id, dtype=torch.long, device=dev)
        chunk = 8 if control is None else control.chunk
        for t in range(max_new_tokens):
            if control is not None and control.stopped:
                break
            sel = logits if hook is None else hook.before(logits, done)
            tok = torch.where(done, pad, self._select(sel, do_sample, temperature, top_p, generator))
            ids[:, t] = tok
            if hook is not None:
                hook.after(t, tok, done)
            done |= torch.isin(tok, eos)
            if control is not None:
                control.steps = t + 1
            if t + 1 == max_new_tokens or ((t + 1) % chunk == 0 and bool(done.all())):
                break
            if control is not None and (t + 1) % chunk == 0:
                control.chunk_done(ids, t + 1)
                if control.stopped:
                    break
            state.tok[:B] = tok
            logits = step()[:B]  # (B, V)
        return ids

    @staticmethod
    def _select(logits, do_sample, temperature, top_p, generator):
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest prefix reaching top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        # exponential race: argmax(p / E) samples from p without a host sync
        e = torch.empty_like(probs).exponential_(1, generator=generator)
        return (probs / e).argmax(-1)
