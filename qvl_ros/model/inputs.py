"""What the model takes: the checks and normalization of a batch of frames / clips, prompts and
clip frame rates (used by :class:`qvl_ros.model.model.BatchedQwenVL` and :mod:`.grounding`)."""
from __future__ import annotations

import math

import torch

from .processor import DEFAULT_FPS, image_size_problem

__all__ = ["check_images", "check_fps"]


def _check_entry(x, b: int, n: int) -> torch.Tensor:
    """One camera entry: a uint8 (3, H, W) image, or a clip as (T, 3, H, W) or a list of T frames."""
    if isinstance(x, (list, tuple)):  # a clip as a list of frames
        if len(x) == 0:
            raise ValueError(f"clip [{b}][{n}] has no frames (T = 0); a clip needs T >= 1")
        for k, f in enumerate(x):
            if not isinstance(f, torch.Tensor) or f.dim() != 3:
                raise ValueError(f"clip [{b}][{n}] frame {k} must be a (3, H, W) tensor")
            if f.shape != x[0].shape:
                raise ValueError(f"clip [{b}][{n}] mixes frame sizes: frame {k} is {tuple(f.shape)}, frame 0 is "
                                 f"{tuple(x[0].shape)}; all frames of a clip must have one size")
        x = torch.stack(list(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"image [{b}][{n}] must be a torch tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise ValueError(f"image [{b}][{n}] must be uint8, got {x.dtype}")
    if x.dim() == 4:
        if x.shape[0] < 1:
            raise ValueError(f"clip [{b}][{n}] has no frames (T = 0); a clip needs T >= 1")
        if x.shape[1] != 3:
            raise ValueError(f"clip [{b}][{n}] must have shape (T, 3, H, W), got {tuple(x.shape)}")
    elif x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"image [{b}][{n}] must have shape (3, H, W) (or a clip (T, 3, H, W)), got {tuple(x.shape)}")
    problem = image_size_problem(*x.shape[-2:])
    if problem:
        raise ValueError(f"{'clip' if x.dim() == 4 else 'image'} [{b}][{n}]: {problem}")
    return x


def check_images(images, prompts) -> list[list[torch.Tensor]]:
    """Validate and normalize input to a list (B) of lists (N) of uint8 (3, H, W) images or
    (T, 3, H, W) clips."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a list of strings, one per sample")
    if isinstance(images, torch.Tensor):
        if images.dim() not in (5, 6):
            raise ValueError(f"images must have shape (B, N, 3, H, W) or clips (B, N, T, 3, H, W), got rank "
                             f"{images.dim()} {tuple(images.shape)}")
        batch = [list(s.unbind(0)) for s in images.unbind(0)]
    elif isinstance(images, (list, tuple)):
        batch = []
        for b, cams in enumerate(images):
            if isinstance(cams, torch.Tensor) and cams.dim() in (4, 5):
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
        batch[b] = [_check_entry(x, b, n) for n, x in enumerate(cams)]
    return batch


def check_fps(fps, batch: list) -> list[list[float]] | None:
    """Frame rate of every clip: one number for all, one per sample, or a list per camera of a
    sample; None -> 2 fps (DEFAULT_FPS). Entries for still images are ignored."""
    if not any(x.dim() == 4 for cams in batch for x in cams):
        return None
    fps = DEFAULT_FPS if fps is None else fps
    if not isinstance(fps, (list, tuple)):
        fps = [fps] * len(batch)
    if len(fps) != len(batch):
        raise ValueError(f"fps: got {len(fps)} values for {len(batch)} samples")
    out = []
    for b, (f, cams) in enumerate(zip(fps, batch)):
        f = list(f) if isinstance(f, (list, tuple)) else [f] * len(cams)
        if len(f) != len(cams):
            raise ValueError(f"fps[{b}]: got {len(f)} values for {len(cams)} cameras")
        for n, (r, x) in enumerate(zip(f, cams)):
            if x.dim() == 4 and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
                raise ValueError(f"fps of clip [{b}][{n}] must be a positive number, got {r!r}")
        out.append([float(r) if x.dim() == 4 else 0.0 for r, x in zip(f, cams)])
    return out
