"""Tensor processor: uint8 camera frames and clips, and prompts -> model inputs, on the model device.

Images: smart_resize (factor 28, min/max pixels, or an exact size) with bicubic antialiased
resize, rescale + CLIP normalization, patchify into `(patches, C*14*14)` rows and `grid_thw`.
The reference repeats every still image twice along time (temporal patch 2) before patchifying,
giving `C*2*14*14` rows; the patch embedding here folds that repeat into its weights, so the
rows are half as wide. `hf_pixel_values` rebuilds the reference layout for comparisons.
Clips `(T, 3, H, W)`: resized within the video pixel bounds, an odd T padded by repeating the last
frame, and each pair of frames patchified into `C*2*14*14` rows (the reference video layout);
frames are used as given, never resampled.
Text: the checkpoint's chat template, one `<|image_pad|>` / `<|video_pad|>` per merged vision
token, left padding, and M-RoPE position ids (t, h, w) computed on the host from the known layout
(no device sync). A clip's time index is the temporal patch index (Qwen2-VL) or, for Qwen2.5-VL,
`floor(i * seconds_per_patch * tokens_per_second)` with seconds_per_patch = 2 / fps; the text after
a vision block continues from the largest position used so far plus one (the published
get_rope_index; transformers 5.23 continues from start + max(h, w) instead, which differs only
after a clip whose time index outruns its height and width).
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


# The video processor's defaults (transformers Qwen2VLVideoProcessor), for checkpoints without
# any processor config; a checkpoint's own bounds take precedence (see TensorProcessor.from_pretrained).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# qwen-vl-utils' bound on a whole clip: a frame gets at most an even share of 90% of a 128k-token
# context (only long clips are affected: below ~190 frames the per-frame bound is the smaller one)
VIDEO_TOTAL_TOKENS = 128000
DEFAULT_FPS = 2.0  # qwen-vl-utils' sampling rate, what the model saw in training


def clip_time_index(t: int, seconds_per_patch: float, tokens_per_second: float, scaled: bool) -> np.ndarray:
    """M-RoPE time index of each temporal patch of a clip, (t,) int64.

    Qwen2.5-VL (`scaled`): `floor(i * seconds_per_patch * tokens_per_second)` in float32 in this
    order, as the published get_rope_index computes it; Qwen2-VL: the patch index i."""
    i = np.arange(t, dtype=np.float32)
    if not scaled:
        return i.astype(np.int64)
    x = (i * np.float32(seconds_per_patch)) * np.float32(tokens_per_second)  # float32 throughout
    return np.floor(x).astype(np.int64)


def _pixel_bounds(conf: dict, lo: int, hi: int) -> tuple[int, int]:
    """(min, max) pixels of a processor config: `min_pixels`/`max_pixels` take precedence over
    `size.shortest_edge/longest_edge`, as transformers' Qwen2-VL processors apply them."""
    size = conf.get("size") or {}
    return (conf.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or lo,
            conf.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or hi)


@dataclass
class Batch:
    """Model inputs for B samples x N cameras (all tensors on the model device)."""
    pixels: torch.Tensor          # (P, C*p*p) float, images in order b-major, n-minor, raster patch order
    grids: list                   # [(t, gh, gw)] per camera entry (image or clip), host ints
    images_per_sample: list       # [N_b]
    input_ids: torch.Tensor       # (B, L) long, left padded
    attention_mask: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor    # (3, B, L) long
    next_position: torch.Tensor   # (B,) long: M-RoPE position of the first generated token
    lengths: list                 # [L_b] real (unpadded) lengths
    clip_pixels: torch.Tensor | None = None  # (Pv, C*T*p*p) float, clips in entry order; None without clips
    clips: list | None = None     # [bool] per entry, True for a clip; None when there is no clip


class TensorProcessor:
    def __init__(self, cfg: QwenVLConfig, tokenizer, chat_template: str | None,
                 min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                 image_mean=CLIP_MEAN,
                 image_std=CLIP_STD, rescale_factor: float = 1 / 255,
                 device="cpu", video_min_pixels: int = VIDEO_MIN_PIXELS, video_max_pixels: int = VIDEO_MAX_PIXELS,
                 video_mean=None, video_std=None, video_rescale_factor: float | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.video_min_pixels, self.video_max_pixels = int(video_min_pixels), int(video_max_pixels)
        self.factor = cfg.patch_size * cfg.merge_size
        self.device = torch.device(device)
        # rescale folded into normalization, in float32, as the reference processor does
        self.mean = (torch.tensor(image_mean, dtype=torch.float32) * (1.0 / rescale_factor)).view(1, 3, 1, 1)
        self.std = (torch.tensor(image_std, dtype=torch.float32) * (1.0 / rescale_factor)).view(1, 3, 1, 1)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        vr = 1.0 / (video_rescale_factor or rescale_factor)
        self.video_mean = (torch.tensor(video_mean or image_mean, dtype=torch.float32) * vr).view(1, 3, 1, 1).to(self.device)
        self.video_std = (torch.tensor(video_std or image_std, dtype=torch.float32) * vr).view(1, 3, 1, 1).to(self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prompt_cache: dict[tuple[str, int], list[int]] = {}

    @classmethod
    def from_pretrained(cls, path, cfg: QwenVLConfig, device="cpu", min_pixels=None, max_pixels=None,
                        video_min_pixels=None, video_max_pixels=None):
        """Read tokenizer, chat template and pixel bounds from a checkpoint directory.

        Both processor config forms are read: the flat `preprocessor_config.json` of released
        checkpoints (`min_pixels`, `max_pixels`) and the nested `processor_config.json` that
        transformers 5.x writes (`image_processor.size.shortest_edge/longest_edge`). Clip bounds
        come from where transformers reads its video processor: the nested `video_processor`,
        else `video_preprocessor_config.json`, else `preprocessor_config.json`; without any of
        them, the video processor's defaults (128 to 768 x 28² pixels).
        """
        import json

        from transformers import AutoTokenizer

        path = Path(path)
        flat: dict = {}
        if (path / "preprocessor_config.json").exists():
            flat = json.loads((path / "preprocessor_config.json").read_text())
        nested = {}
        if (path / "processor_config.json").exists():
            nested = json.loads((path / "processor_config.json").read_text())
        ip = {**flat, **nested.get("image_processor", {})}
        if "video_processor" in nested:
            vp = nested["video_processor"]
        elif (path / "video_preprocessor_config.json").exists():
            vp = json.loads((path / "video_preprocessor_config.json").read_text())
        else:
            vp = flat
        lo, hi = _pixel_bounds(ip, 56 * 56, 28 * 28 * 1280)
        vlo, vhi = _pixel_bounds(vp, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        template = None
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text())["chat_template"]
        elif nested.get("chat_template"):
            template = nested["chat_template"]
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # a garbled tokenizer.json / vocab.json: a JSON, Rust or value error
            named = path / "tokenizer.json" if (path / "tokenizer.json").exists() else path
            raise ValueError(f"{named}: the tokenizer does not load ({type(exc).__name__}: {str(exc)[:200]})") from None
        if template is None:
            template = tok.chat_template
        if template is None:
            raise ValueError(f"{path} has no chat template (chat_template.jinja/json or tokenizer_config)")
        return cls(cfg, tok, template, min_pixels=min_pixels or lo, max_pixels=max_pixels or hi,
                   image_mean=ip.get("image_mean", CLIP_MEAN),
                   image_std=ip.get("image_std", CLIP_STD),
                   rescale_factor=ip.get("rescale_factor", 1 / 255), device=device,
                   video_min_pixels=video_min_pixels or vlo, video_max_pixels=video_max_pixels or vhi,
                   video_mean=vp.get("image_mean"), video_std=vp.get("image_std"),
                   video_rescale_factor=vp.get("rescale_factor"))

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

    def clip_target_size(self, height: int, width: int, frames: int, size=None) -> tuple[int, int]:
        """A clip's frame size: the video pixel bounds, the per-frame share of the whole-clip bound."""
        if size is not None:
            return self.target_size(height, width, size)
        f = self.factor
        total = int(VIDEO_TOTAL_TOKENS * f * f * 0.9)
        hi = max(min(self.video_max_pixels, total * self.cfg.temporal_patch_size // frames),
                 int(self.video_min_pixels * 1.05))
        return smart_resize(height, width, f, self.video_min_pixels, hi)

    def clip_patches(self, clips: list[torch.Tensor], size=None) -> tuple[torch.Tensor, list]:
        """uint8 (T, 3, H, W) clips -> normalized patch rows (P, 3*Tp*p*p) and grids [(t, gh, gw)].

        Tp = temporal_patch_size (2): frames 2i and 2i+1 make temporal patch i; an odd T is padded
        by repeating the last frame. Rows are ordered t, then merge units in raster order, and
        laid out (C, Tp, p, p) as the reference's Conv3d expects. Clips of one shape go together.
        """
        from torchvision.transforms.v2 import functional as tvF

        p, m, Tp = self.cfg.patch_size, self.cfg.merge_size, self.cfg.temporal_patch_size
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(clips):
            groups.setdefault(tuple(c.shape), []).append(i)
        targets = {shape: self.clip_target_size(shape[2], shape[3], shape[0], size) for shape in groups}
        grids = []
        for c in clips:
            th, tw = targets[tuple(c.shape)]
            grids.append((-(-c.shape[0] // Tp), th // p, tw // p))
        offsets = [0]
        for t, gh, gw in grids:
            offsets.append(offsets[-1] + t * gh * gw)
        out = torch.empty(offsets[-1], 3 * Tp * p * p, device=self.device)  # (P, 3*Tp*p*p)
        for (T, _, h, w), idx in groups.items():
            th, tw = targets[(T, 3, h, w)]
            G = len(idx)
            x = torch.stack([clips[i] for i in idx]).to(self.device, non_blocking=True)  # (G, T, 3, h, w) uint8
            x = x.view(G * T, 3, h, w)
            if (th, tw) != (h, w):
                x = tvF.resize(x, [th, tw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            x = x.float().sub_(self.video_mean).div_(self.video_std).view(G, T, 3, th, tw)
            if T % Tp:
                x = torch.cat([x, x[:, -1:].expand(G, Tp - T % Tp, 3, th, tw)], dim=1)  # (G, t*Tp, 3, th, tw)
            t, gh, gw = -(-T // Tp), th // p, tw // p
            x = x.view(G, t, Tp, 3, gh // m, m, p, gw // m, m, p)
            x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (G, t, gh/m, gw/m, m, m, 3, Tp, p, p)
            for j, i in enumerate(idx):
                out[offsets[i]:offsets[i + 1]].view(t, gh // m, gw // m, m, m, 3, Tp, p, p).copy_(x[j])
        return out, grids

    # ------------------------------------------------------------------ text
    def prompt_ids(self, prompt: str, kinds) -> list[int]:
        """Token ids of one sample's conversation with one placeholder per camera (cached).

        `kinds`: the number of still images, or one bool per camera (True: a clip)."""
        kinds = (False,) * kinds if isinstance(kinds, int) else tuple(bool(k) for k in kinds)
        key = (prompt, kinds)
        ids = self._prompt_cache.get(key)
        if ids is None:
            parts = [{"type": "video" if k else "image"} for k in kinds]
            conv = [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]
            text = self.tokenizer.apply_chat_template(conv, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text)["input_ids"]
            pads = [t for t in ids if t in (self.cfg.image_token_id, self.cfg.video_token_id)]
            if pads != [self.cfg.video_token_id if k else self.cfg.image_token_id for k in kinds]:
                raise ValueError("the chat template did not render one image or video placeholder per camera")
            if len(self._prompt_cache) > 256:
                self._prompt_cache.clear()
            self._prompt_cache[key] = ids
        return ids

    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special tokens (``<|im_start|>``, ``<|image_pad|>``, ...), longest first."""
        tok = self.tokenizer
        names = set(getattr(tok, "all_special_tokens", ()) or ())
        added = getattr(tok, "added_tokens_decoder", None) or {}
        names |= {t.content for t in added.values() if getattr(t, "special", False)}
        return tuple(sorted((n for n in names if n), key=len, reverse=True))

    def prompt_problem(self, prompt: str, kinds) -> str | None:
        """Why ``prompt`` cannot be a sample's text, or None: it contains a special token of the
        chat template (the text would add or close turns, or images the set does not have), or
        the template fails to render it with one placeholder per camera (``kinds`` as in
        :meth:`prompt_ids`)."""
        found = [t for t in self.special_tokens() if t in prompt]
        if found:
            return f"the prompt contains the chat template's special token(s) {', '.join(found[:5])}"
        try:
            self.prompt_ids(prompt, kinds)
        except Exception as exc:  # a template error, a tokenizer error
            return f"the chat template fails on the prompt: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    def expand_and_position(self, ids: list[int], grids: list, seconds: list | None = None
                            ) -> tuple[np.ndarray, np.ndarray, int]:
        """Expand each placeholder to its token count; M-RoPE positions (3, L); next text position.

        `seconds`: per entry, None for a still image, else the clip's seconds per temporal patch."""
        m, cfg = self.cfg.merge_size, self.cfg
        pads = (cfg.image_token_id, cfg.video_token_id)
        seconds = seconds or [None] * len(grids)
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
            if t not in pads:
                run.append(t)
                continue
            flush_text()
            gt, gh, gw = grids[k]
            spp = seconds[k]
            k += 1
            h, w = gh // m, gw // m
            n = gt * h * w
            out_ids.append(np.full(n, t, dtype=np.int64))
            times = np.zeros(1, np.int64) if spp is None else clip_time_index(gt, spp, cfg.tokens_per_second, cfg.is_v25)
            tt = np.repeat(times, h * w)
            hh = np.tile(np.repeat(np.arange(h), w), gt)
            ww = np.tile(np.arange(w), gt * h)
            out_pos.append(np.stack([tt, hh, ww]) + cur)  # (3, n)
            cur += max(int(times[-1]), h - 1, w - 1) + 1  # the next position after the largest one used
        flush_text()
        return np.concatenate(out_ids), np.concatenate(out_pos, axis=1), cur

    # ------------------------------------------------------------------ both
    def __call__(self, images: list[list[torch.Tensor]], prompts: list[str], size=None, fps=None) -> Batch:
        """`images[b][n]`: uint8 (3, H, W) image or (T, 3, H, W) clip; `fps[b][n]`: clip frame rate."""
        flat = [im for cams in images for im in cams]
        clips = [im.dim() == 4 for im in flat]
        if any(clips):
            pixels, img_grids = self.pixel_patches([im for im, c in zip(flat, clips) if not c], size)
            clip_pixels, clip_grids = self.clip_patches([im for im, c in zip(flat, clips) if c], size)
            it_img, it_clip = iter(img_grids), iter(clip_grids)
            grids = [next(it_clip) if c else next(it_img) for c in clips]
            rates = [r for cams in (fps or [[DEFAULT_FPS] * len(c) for c in images]) for r in cams]
            seconds = [self.cfg.temporal_patch_size / r if c else None for c, r in zip(clips, rates)]
        else:
            pixels, grids = self.pixel_patches(flat, size)
            clip_pixels, seconds = None, [None] * len(flat)
        seqs, poss, nexts = [], [], []
        k = 0
        for cams, prompt in zip(images, prompts):
            n = len(cams)
            kinds = tuple(clips[k:k + n])
            ids, pos, nxt = self.expand_and_position(self.prompt_ids(prompt, kinds), grids[k:k + n], seconds[k:k + n])
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
                     next_position=put(np.asarray(nexts, dtype=np.int64)), lengths=[len(s) for s in seqs],
                     clip_pixels=clip_pixels, clips=clips if any(clips) else None)
