"""The one model call of the pipeline: a batch of synchronized sets -> features and/or texts.

Used by the node's worker (features, captions), offline extraction (the same) and ``~/ask``
(an answer about one set, optionally a subset of its cameras), so the three agree on what the
model sees: the sets' frames (or clips) in camera order, one prompt per set, the clips' frame
rates taken from their stamps (``ClipSet.fps``; Qwen2.5-VL's time positions depend on them), and
one token limit.

Detections (:class:`DetectRequest`, :func:`call_detect`) are a second call on the same sets: one
``model.detect`` for all sets of a batch (one decoder row per camera and set, each answer about
one image), constrained to the detection grammar; a clip set's detections refer to the newest
frame of each camera's clip (the frame whose header the set carries).

A set is anything with ``items`` (per camera an object with ``image``: a uint8 (3, H, W) frame or
a clip, a list of such frames oldest first) and, for clips, ``fps`` (per camera).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["ModelRequest", "DetectRequest", "model_inputs", "call_model", "call_detect"]


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


@dataclass(frozen=True)
class DetectRequest:
    """What one detection call asks for: ``classes`` (names; when empty, ``query``, free text),
    the most and fewest detections per camera, and whether the answer is constrained to the
    detection grammar (None: when llguidance is installed)."""

    classes: tuple = ()
    query: str = ""
    max_detections: int = 10
    min_detections: int = 0
    constrained: Optional[bool] = None

    def __post_init__(self) -> None:
        if not self.classes and not self.query.strip():
            raise ValueError("detections need classes or a query")
        if not 1 <= int(self.max_detections) or not 0 <= int(self.min_detections) <= int(self.max_detections):
            raise ValueError(f"need 0 <= min_detections <= max_detections and max_detections >= 1, got "
                             f"{self.min_detections} and {self.max_detections}")

    @property
    def targets(self) -> Any:
        """What ``model.detect`` takes: the class list, or the query."""
        return list(self.classes) if self.classes else self.query


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


def call_detect(model: Any, sets: Sequence[Any], request: DetectRequest,
                cameras: Optional[Sequence[int]] = None, control: Any = None) -> list:
    """Run ``model.detect`` once on ``sets``: per set, per chosen camera (default: all), a
    ``CameraDetections`` in that camera's pixels (a clip: its newest frame). ``control``: as for
    :func:`call_model` (a stopped call returns the detections parsed from the tokens so far)."""
    images, _ = model_inputs(sets, cameras)
    extra = {} if control is None else {"control": control}
    return model.detect(images, request.targets, constrained=request.constrained,
                        max_detections=int(request.max_detections), min_detections=int(request.min_detections),
                        **extra)
