"""BatchedQwenVL: Qwen2.5-VL / Qwen2-VL over B samples x N cameras in one call.

    model = BatchedQwenVL.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    feats = model.encode(frames, prompts)       # frames: uint8 (B, N, 3, H, W) or nested lists
    texts = model.generate(frames, prompts, max_new_tokens=32)

Everything between the uint8 frames and the returned tensors stays on the model device; the only
host work is index math known from image sizes and the tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_weights
from .config import QwenVLConfig
from .decoding import StepRunner
from .processor import Batch, TensorProcessor
from .text import Decoder
from .vision import VisionTower


@dataclass
class Features:
    vision: list          # [B][N] tensors (tokens_n, D): merged vision tokens of each camera
    hidden: torch.Tensor  # (B, L, D) decoder last hidden state after the final norm, left padded (pads zeroed)
    attention_mask: torch.Tensor  # (B, L)
    input_ids: torch.Tensor       # (B, L)


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype, device: torch.device, config_dtype: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config_dtype or "", torch.bfloat16)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return table[dtype]


def check_images(images, prompts) -> list[list[torch.Tensor]]:
    """Validate and normalize input to a list (B) of lists (N) of uint8 (3, H, W) tensors."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a list of strings, one per sample")
    if isinstance(images, torch.Tensor):
        if images.dim() != 5:
            raise ValueError(f"images must have shape (B, N, 3, H, W), got rank {images.dim()} {tuple(images.shape)}")
        batch = [list(s.unbind(0)) for s in images.unbind(0)]
    elif isinstance(images, (list, tuple)):
        batch = []
        for b, cams in enumerate(images):
            if isinstance(cams, torch.Tensor) and cams.dim() == 4:
                cams = list(cams.unbind(0))
            if not isinstance(cams, (list, tuple)):
                raise ValueError(f"images[{b}] must be a list of (3, H, W) tensors, got {type(cams).__name__}")
            batch.append(list(cams))
    else:
        raise ValueError(f"images must be a uint8 tensor (B, N, 3, H, W) or nested lists, got {type(images).__name__}")
    if len(batch) == 0:
        raise ValueError("empty batch: no samples")
    if len(batch) != len(prompts):
        raise ValueError(f"got {len(batch)} samples but {len(prompts)} prompts")
    for b, cams in enumerate(batch):
        if not isinstance(prompts[b], str):
            raise ValueError(f"prompts[{b}] must be a string")
        if len(cams) == 0:
            raise ValueError(f"sample {b} has no camera images")
        for n, im in enumerate(cams):
            if not isinstance(im, torch.Tensor):
                raise ValueError(f"image [{b}][{n}] must be a torch tensor, got {type(im).__name__}")
            if im.dtype != torch.uint8:
                raise ValueError(f"image [{b}][{n}] must be uint8, got {im.dtype}")
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"image [{b}][{n}] must have shape (3, H, W), got {tuple(im.shape)}")
            h, w = im.shape[1:]
            if min(h, w) < 28:
                raise ValueError(f"image [{b}][{n}] is {h}x{w} px: smaller than 28 px on a side")
            if max(h, w) / min(h, w) > 200:
                raise ValueError(f"image [{b}][{n}] is {h}x{w} px: aspect ratio over 200")
    return batch


class BatchedQwenVL(nn.Module):
    def __init__(self, cfg: QwenVLConfig, processor: TensorProcessor, eos_ids=(), pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.processor = processor
        self.visual = VisionTower(cfg)
        self.decoder = Decoder(cfg)
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
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, min_pixels=None, max_pixels=None):
        """Load a Qwen2.5-VL or Qwen2-VL checkpoint directory (safetensors only, no remote code)."""
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
        raw = json.loads((path / "config.json").read_text())
        if raw.get("quantization_config"):
            q = raw["quantization_config"].get("quant_method", "?")
            raise ValueError(f"{path}: quantized checkpoints ({q}) are not supported; use a float checkpoint")
        hf = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        cfg = QwenVLConfig.from_hf(hf)
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, device, raw.get("torch_dtype") or raw.get("dtype"))
        proc = TensorProcessor.from_pretrained(path, cfg, device=device, min_pixels=min_pixels,
                                               max_pixels=max_pixels)
        eos = []
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            e = json.loads(gen_path.read_text()).get("eos_token_id")
            eos = e if isinstance(e, list) else ([e] if e is not None else [])
        if not eos and proc.tokenizer.eos_token_id is not None:
            eos = [proc.tokenizer.eos_token_id]
        with torch.device("meta"):
            model = cls(cfg, proc, eos_ids=eos, pad_id=proc.pad_id)
        model = model.to_empty(device="cpu")
        weights = read_weights(path, cfg)
        model.visual.load(weights)
        model.decoder.load(weights)
        del weights
        if dtype == torch.float32:
            model.visual.fold_norms()
        model.visual.reset_buffers()  # buffers are computed, not stored in the checkpoint
        model.decoder.reset_buffers()
        model = model.to(device=device, dtype=dtype)
        model.visual.inv_freq = model.visual.inv_freq.float()
        model.decoder.inv_freq = model.decoder.inv_freq.float()
        model.name = str(path)
        return model.eval().requires_grad_(False)

    @torch.inference_mode()
    def warmup(self, sizes, batch_sizes=(1,), prompt: str = "Describe the scene.", max_new_tokens: int = 32,
               compile_vision: bool | None = None) -> float:
        """Pay one-time costs before the first frame; returns the seconds it took.

        `sizes`: one (H, W) per camera, as the frames will arrive; `batch_sizes`: the batch sizes
        that will run. For each, one encode + caption on blank frames builds the vision layout
        cache and, on CUDA, captures the decode step's CUDA graph for its bucket and (with
        `compile_vision`, default: on CUDA) compiles the vision blocks for that layout."""
        import time

        t0 = time.perf_counter()
        if compile_vision is None:
            compile_vision = self.device.type == "cuda"
        if compile_vision:
            self.visual.compile_blocks()
        for b in batch_sizes:
            frames = [[torch.zeros(3, h, w, dtype=torch.uint8, device=self.device) for h, w in sizes]
                      for _ in range(b)]
            try:
                self._run(frames, [prompt] * b, None, max_new_tokens)
            except Exception as exc:  # a compiler missing on this machine: keep the eager blocks
                if not compile_vision:
                    raise
                import warnings

                warnings.warn(f"torch.compile of the vision blocks failed, running them eagerly: {exc}")
                compile_vision = False
                self.visual.compile_blocks(False)
                self._run(frames, [prompt] * b, None, max_new_tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ pieces
    def prepare(self, images, prompts, size=None) -> tuple[list, Batch]:
        batch = check_images(images, prompts)
        return batch, self.processor(batch, list(prompts), size=size)

    def vision_features(self, inputs: Batch) -> torch.Tensor:
        """(total merged tokens, D) for all images of the batch, in input order."""
        return self.visual(inputs.pixels.to(self.dtype), inputs.grids)

    def embed(self, inputs: Batch, vis: torch.Tensor) -> torch.Tensor:
        x = self.decoder.embed(inputs.input_ids)  # (B, L, D)
        mask = (inputs.input_ids == self.cfg.image_token_id).unsqueeze(-1)  # (B, L, 1)
        return x.masked_scatter(mask, vis.to(x.dtype))

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def encode(self, images, prompts, size=None) -> Features:
        """Vision tokens per camera and decoder last hidden states for B samples x N cameras."""
        return self._run(images, prompts, size, 0)[0]

    @torch.inference_mode()
    def generate_ids(self, images, prompts, max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, size=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, max_new_tokens) generated token ids; after a row's end token the row holds pad ids."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        return self._run(images, prompts, size, max_new_tokens, do_sample, temperature, top_p, generator)[1]

    def generate(self, images, prompts, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, size=None,
                 generator: torch.Generator | None = None) -> list[str]:
        """Batched generation with a KV cache; each row stops at its own end token."""
        ids = self.generate_ids(images, prompts, max_new_tokens, do_sample, temperature, top_p, size, generator)
        return self.decode(ids)

    @torch.inference_mode()
    def encode_generate(self, images, prompts, max_new_tokens: int = 32, do_sample: bool = False,
                        temperature: float = 1.0, top_p: float = 1.0, size=None,
                        generator: torch.Generator | None = None) -> tuple[Features, list[str]]:
        """Features and captions from one vision pass and one prefill."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        feats, ids = self._run(images, prompts, size, max_new_tokens, do_sample, temperature, top_p, generator)
        return feats, self.decode(ids)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.processor.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)

    def _run(self, images, prompts, size, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, generator=None):
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")
        _, inputs = self.prepare(images, prompts, size)
        B, L = inputs.input_ids.shape
        state = step = None
        if max_new_tokens:
            state, step = self.steps.get(B, L + max_new_tokens)
        vis = self.vision_features(inputs)
        pads = [L - n for n in inputs.lengths]
        padded = any(pads)
        hidden = self.decoder(self.embed(inputs, vis), inputs.position_ids, inputs.attention_mask, pads,
                              state.prefill_caches(B) if state else None)
        counts = [g[1] * g[2] // self.cfg.merge_size ** 2 for g in inputs.grids]
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
        return feats, self._decode(logits, state, step, max_new_tokens, do_sample, temperature, top_p, generator)

    def _decode(self, logits, state, step, max_new_tokens, do_sample, temperature, top_p, generator):
        """Token loop: select, record, feed back. Host syncs only every 8 tokens (all rows done?)."""
        B, dev = logits.shape[0], logits.device
        eos = torch.tensor(self.eos_ids or [-1], device=dev)
        ids = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        pad = torch.full((B,), self.pad_id, dtype=torch.long, device=dev)
        for t in range(max_new_tokens):
            tok = torch.where(done, pad, self._select(logits, do_sample, temperature, top_p, generator))
            ids[:, t] = tok
            done |= torch.isin(tok, eos)
            if t + 1 == max_new_tokens or ((t + 1) % 8 == 0 and bool(done.all())):
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
