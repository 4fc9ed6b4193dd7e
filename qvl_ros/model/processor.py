"""Tensor processor: uint8 camera frames and prompts -> model inputs, on the model device.

Images: smart_resize (factor 28, min/max pixels, or an exact size) with bicubic antialiased
resize, rescale + CLIP normalization, patchify into `(patches, C*14*14)` rows and `grid_thw`.
The reference repeats every still image twice along time (temporal patch 2) before patchifying,
giving `C*2*14*14` rows; the patch embedding here folds that repeat into its weights, so the
rows are half as wide. `hf_pixel_values` rebuilds the reference layout for comparisons.
Text: the checkpoint's chat template, one `<|image_pad|>` per merged vision token, left padding,
and M-RoPE position ids (t, h, w) computed on the host from the known layout (no device sync).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import QwenVLConfig


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalization, the Qwen-VL default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_SIDE = 28     # px: one merged 2x2 block of 14 px patches
MAX_ASPECT = 200  # longest over shortest side, the reference processor's limit


def image_size_problem(height: int, width: int) -> str | None:
    """Why the model cannot take an image of this size (a sentence), or None if it can."""
    if min(height, width) < MIN_SIDE:
        return f"{height}x{width} px is smaller than {MIN_SIDE} px on a side"
    if max(height, width) / min(height, width) > MAX_ASPECT:
        return f"{height}x{width} px has an aspect ratio over {MAX_ASPECT}"
    return None


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Size with both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if min(height, width) < factor:
        raise ValueError(f"image of {height}x{width} px is smaller than {factor} px on a side")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio of a {height}x{width} image is over {MAX_ASPECT}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass
class Batch:
    """Model inputs for B samples x N cameras (all tensors on the model device)."""
    pixels: torch.Tensor          # (P, C*p*p) float, images in order b-major, n-minor, raster patch order
    grids: list                   # [(t, gh, gw)] per image, host ints
    images_per_sample: list       # [N_b]
    input_ids: torch.Tensor       # (B, L) long, left padded
    attention_mask: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor    # (3, B, L) long
    next_position: torch.Tensor   # (B,) long: M-RoPE position of the first generated token
    lengths: list                 # [L_b] real (unpadded) lengths


class TensorProcessor:
    def __init__(self, cfg: QwenVLConfig, tokenizer, chat_template: str | None,
                 min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                 image_mean=CLIP_MEAN,
                 image_std=CLIP_STD, rescale_factor: float = 1 / 255,
                 device="cpu"):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.factor = cfg.patch_size * cfg.merge_size
        self.device = torch.device(device)
        # rescale folded into normalization, in float32, as the reference processor does
        self.mean = (torch.tensor(image_mean, dtype=torch.float32) * (1.0 / rescale_factor)).view(1, 3, 1, 1)
        self.std = (torch.tensor(image_std, dtype=torch.float32) * (1.0 / rescale_factor)).view(1, 3, 1, 1)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prompt_cache: dict[tuple[str, int], list[int]] = {}

    @classmethod
    def from_pretrained(cls, path, cfg: QwenVLConfig, device="cpu", min_pixels=None, max_pixels=None):
        """Read tokenizer, chat template and pixel bounds from a checkpoint directory.

        Both processor config forms are read: the flat `preprocessor_config.json` of released
        checkpoints (`min_pixels`, `max_pixels`) and the nested `processor_config.json` that
        transformers 5.x writes (`image_processor.size.shortest_edge/longest_edge`).
        """
        import json

        from transformers import AutoTokenizer

        path = Path(path)
        ip: dict = {}
        if (path / "preprocessor_config.json").exists():
            ip = json.loads((path / "preprocessor_config.json").read_text())
        nested = {}
        if (path / "processor_config.json").exists():
            nested = json.loads((path / "processor_config.json").read_text())
            ip = {**ip, **nested.get("image_processor", {})}
        size = ip.get("size") or {}
        lo = ip.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56
        hi = ip.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or 28 * 28 * 1280
        template = None
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        elif nested.get("chat_template"):
            template = nested["chat_template"]
        tok = AutoTokenizer.from_pretrained(str(path))
        if template is None:
            template = tok.chat_template
        if template is None:
            raise ValueError(f"{path} has no chat template (chat_template.jinja/json or tokenizer_config)")
        return cls(cfg, tok, template, min_pixels=min_pixels or lo, max_pixels=max_pixels or hi,
                   image_mean=ip.get("image_mean", CLIP_MEAN),
                   image_std=ip.get("image_std", CLIP_STD),
                   rescale_factor=ip.get("rescale_factor", 1 / 255), device=device)

    # ------------------------------------------------------------------ images
    def target_size(self, height: int, width: int, size: tuple[int, int] | None = None) -> tuple[int, int]:
        if size is not None:
            h, w = int(size[0]), int(size[1])
            if h % self.factor or w % self.factor or h <= 0 or w <= 0:
                raise ValueError(f"exact size {size} must be positive multiples of {self.factor}")
            return h, w
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def pixel_patches(self, images: list[torch.Tensor], size=None) -> tuple[torch.Tensor, list]:
        """uint8 (3, H, W) images -> normalized patch rows (P, 3*p*p) and grids [(1, gh, gw)].

        Images of the same size are resized, normalized and patchified together.
        """
        from torchvision.transforms.v2 import functional as tvF

        p, m = self.cfg.patch_size, self.cfg.merge_size
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        targets = {hw: self.target_size(*hw, size) for hw in groups}
        grids = [(1, targets[tuple(im.shape[-2:])][0] // p, targets[tuple(im.shape[-2:])][1] // p) for im in images]
        offsets = [0]
        for _, gh, gw in grids:
            offsets.append(offsets[-1] + gh * gw)
        out = torch.empty(offsets[-1], 3 * p * p, device=self.device)  # (P, 3*p*p)
        for (h, w), idx in groups.items():
            th, tw = targets[(h, w)]
            x = torch.stack([images[i] for i in idx]).to(self.device, non_blocking=True)  # (G, 3, h, w) uint8
            if (th, tw) != (h, w):
                x = tvF.resize(x, [th, tw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            x = x.float().sub_(self.mean).div_(self.std)  # (G, 3, th, tw), as the reference normalizes
            gh, gw = th // p, tw // p
            x = x.view(len(idx), 3, gh // m, m, p, gw // m, m, p)
            x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (G, gh/m, gw/m, m, m, 3, p, p)
            for j, i in enumerate(idx):  # written straight into the packed output
                out[offsets[i]:offsets[i + 1]].view(gh // m, gw // m, m, m, 3, p, p).copy_(x[j])
        return out, grids

    def hf_pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """(P, 3*p*p) rows -> the reference layout (P, 3*T*p*p) with each frame repeated T times."""
        T, p = self.cfg.temporal_patch_size, self.cfg.patch_size
        x = pixels.view(-1, 3, 1, p * p).expand(-1, 3, T, p * p)  # (P, 3, T, p*p)
        return x.reshape(-1, 3 * T * p * p)

    # ------------------------------------------------------------------ text
    def prompt_ids(self, prompt: str, n_images: int) -> list[int]:
        """Token ids of one sample's conversation with a single image pad per image (cached)."""
        key = (prompt, n_images)
        ids = self._prompt_cache.get(key)
        if ids is None:
            conv = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
            text = self.tokenizer.apply_chat_template(conv, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text)["input_ids"]
            if sum(1 for t in ids if t == self.cfg.image_token_id) != n_images:
                raise ValueError("the chat template did not render one image placeholder per camera")
            if len(self._prompt_cache) > 256:
                self._prompt_cache.clear()
            self._prompt_cache[key] = ids
        return ids

    def expand_and_position(self, ids: list[int], grids: list) -> tuple[np.ndarray, np.ndarray, int]:
        """Expand each image pad to its token count; M-RoPE positions (3, L); next text position."""
        m, pad = self.cfg.merge_size, self.cfg.image_token_id
        out_ids: list[np.ndarray] = []
        out_pos: list[np.ndarray] = []
        cur = 0
        k = 0
        run: list[int] = []

        def flush_text():
            nonlocal cur
            if run:
                n = len(run)
                out_ids.append(np.asarray(run, dtype=np.int64))
                out_pos.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
                cur += n
                run.clear()

        for t in ids:
            if t != pad:
                run.append(t)
                continue
            flush_text()
            gt, gh, gw = grids[k]
            k += 1
            h, w = gh // m, gw // m
            n = gt * h * w
            out_ids.append(np.full(n, pad, dtype=np.int64))
            tt = np.repeat(np.arange(gt), h * w)
            hh = np.tile(np.repeat(np.arange(h), w), gt)
            ww = np.tile(np.arange(w), gt * h)
            out_pos.append(np.stack([tt, hh, ww]) + cur)  # (3, n)
            cur += max(h, w)
        flush_text()
        return np.concatenate(out_ids), np.concatenate(out_pos, axis=1), cur

    # ------------------------------------------------------------------ both
    def __call__(self, images: list[list[torch.Tensor]], prompts: list[str], size=None) -> Batch:
        flat = [im for cams in images for im in cams]
        pixels, grids = self.pixel_patches(flat, size)
        seqs, poss, nexts = [], [], []
        k = 0
        for cams, prompt in zip(images, prompts):
            n = len(cams)
            ids, pos, nxt = self.expand_and_position(self.prompt_ids(prompt, n), grids[k:k + n])
            k += n
            seqs.append(ids)
            poss.append(pos)
            nexts.append(nxt)
        B, L = len(seqs), max(len(s) for s in seqs)
        input_ids = np.full((B, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.int64)
        position_ids = np.zeros((3, B, L), dtype=np.int64)
        for b, (s, pos) in enumerate(zip(seqs, poss)):
            input_ids[b, L - len(s):] = s
            mask[b, L - len(s):] = 1
            position_ids[:, b, L - len(s):] = pos
        dev = self.device
        pin = dev.type == "cuda"

        def put(a):
            t = torch.from_numpy(a)
            return (t.pin_memory() if pin else t).to(dev, non_blocking=True)

        return Batch(pixels=pixels, grids=grids, images_per_sample=[len(c) for c in images],
                     input_ids=put(input_ids), attention_mask=put(mask), position_ids=put(position_ids),
                     next_position=put(np.asarray(nexts, dtype=np.int64)), lengths=[len(s) for s in seqs])
