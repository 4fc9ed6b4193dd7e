"""The one model call of the pipeline: a batch of synchronized sets -> features and/or texts.

Used by the node's worker (features, captions), offline extraction (the same) and ``~/ask``
(an answer about one set, optionally a subset of its cameras), so the three agree on what the
model sees: the sets' frames (or clips) in camera order, one prompt per set, the clips' frame
rates taken from their stamps (``ClipSet.fps``; Qwen2.5-VL's time positions depend on them), and
one token limit.

A set is anything with ``items`` (per camera an object with ``image``: a uint8 (3, H, W) frame or
a clip, a list of such frames oldest first) and, for clips, ``fps`` (per camera).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["ModelRequest", "model_inputs", "call_model"]


@dataclass(frozen=True)
class ModelRequest:
    """What one call asks for: the prompt of every set, features, texts (captions or an answer)
    and the longest text in tokens."""

    prompt: str
    features: bool = True
    texts: bool = False
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not (self.features or self.texts):
            raise ValueError("a model request asks for features, texts or both")
        if self.texts and int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def model_inputs(sets: Sequence[Any], cameras: Optional[Sequence[int]] = None) -> tuple[list, Optional[list]]:
    """(images per set, clip frame rates per set or None) of the chosen cameras (default: all)."""
    images, rates = [], []
    clips = bool(sets) and hasattr(sets[0], "fps")
    for s in sets:
        chosen = range(len(s.items)) if cameras is None else cameras
        images.append([s.items[k].image for k in chosen])
        if clips:
            rates.append([float(s.fps[k]) for k in chosen])
    return images, (rates if clips else None)


def call_model(model: Any, sets: Sequence[Any], request: ModelRequest,
               cameras: Optional[Sequence[int]] = None, control: Any = None) -> tuple:
    """Run ``model`` (a ``BatchedQwenVL``) once on ``sets``: (features or None, texts or None).

    Features only: ``encode``; texts only: ``generate``; both: ``encode_generate`` (one vision
    pass and one prefill). ``control`` (:class:`qvl_ros.model.decode_control.DecodeControl`,
    texts only): stop the decoding between two steps and follow its tokens; a stopped call
    returns the texts generated so far (``control.stopped`` says so)."""
    images, rates = model_inputs(sets, cameras)
    prompts = [request.prompt] * len(images)
    extra = {} if rates is None else {"fps": rates}
    if control is not None and request.texts:
        extra["control"] = control
    if request.features and request.texts:
        return model.encode_generate(images, prompts, max_new_tokens=int(request.max_new_tokens), **extra)
    if request.texts:
        return None, model.generate(images, prompts, max_new_tokens=int(request.max_new_tokens), **extra)
    return model.encode(images, prompts, **extra), None
