"""The node's warm-up plan: which camera sizes and batch sizes the model is warmed up for.

`model.warmup_size` names the camera sizes: "HxW" for every camera, "HxW,HxW,..." one per camera,
or "" (unset): the first synchronized set's frames decide, and the warm-up runs in the worker
before that set. The batch sizes are one per decode bucket up to `batch.max_size`
(`decoding.warmup_batch_sizes`), so that on CUDA every (batch, cache length) bucket the node
will use is captured before it takes frames, and no capture happens while it runs.
"""
from __future__ import annotations

from ..model.token_steps import warmup_batch_sizes
from ..model.processor import image_size_problem


def parse_sizes(text: str, cameras: int) -> list[tuple[int, int]] | None:
    """[(H, W)] per camera from "HxW" or "HxW,HxW,..."; None for "" (unset). Raises ValueError."""
    text = str(text).strip().lower()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (1, cameras):
        raise ValueError(f"model.warmup_size: {len(parts)} sizes for {cameras} cameras (give one, or one per camera)")
    sizes = []
    for p in parts:
        hw = p.split("x")
        try:
            h, w = int(hw[0]), int(hw[1])
            if len(hw) != 2:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"model.warmup_size must be HxW (or HxW,HxW,... per camera), got {text!r}") from None
        problem = image_size_problem(h, w)
        if problem:
            raise ValueError(f"model.warmup_size {p}: {problem}")
        sizes.append((h, w))
    return sizes * cameras if len(sizes) == 1 else sizes


def frame_sizes(images) -> list[tuple[int, int]]:
    """(H, W) of each camera entry of one set (a (3, H, W) image or a (T, 3, H, W) clip)."""
    return [(int(x.shape[-2]), int(x.shape[-1])) for x in images]


def batch_sizes(max_size: int) -> list[int]:
    return warmup_batch_sizes(max(1, int(max_size)))
