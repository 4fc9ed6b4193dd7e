"""The intake of the pipeline: camera messages in, synchronized sets (or clip sets) out.

One object, used by the node (a subscription callback per frame) and by offline extraction (a
frame per recorded message), so both apply the same rules in the same order:

1. :meth:`Intake.convert`: the header is checked first
   (:func:`qvl_ros.core.conversion.check_header`: ``frame_id`` length, stamp range), then the message becomes a uint8 (3, H, W) tensor on the model device
   (:func:`qvl_ros.core.conversion.msg_to_tensor`: declared size against ``max_input_pixels``,
   PNG/JPEG structure, encodings), the model's size limits apply
   (:func:`qvl_ros.model.processor.image_size_problem`: 28 px on a side, aspect ratio 200), and
   the frame gets its stamp from ``stamp_source`` (header stamp, arrival time, or the arrival
   time where the header stamp is zero). A frame that fails is counted per camera under a
   bounded reason key (:func:`qvl_ros.core.drop_reasons.reason_key`) and the error is raised for the caller to log.
2. :meth:`Intake.push`: the frame enters its camera's clip ring (clips) and the
   :class:`~qvl_ros.core.synchronizer.Synchronizer` (policy, slop, queue, reorder tolerance,
   reset threshold); complete sets become clip sets (clips; a set whose cameras lack the history
   is counted, not returned) and pass the ``max_rate`` cap on the arrival clock (refused sets are
   counted as ``rate_limit``).

The node calls ``convert`` outside its lock and ``push`` under it; extraction calls both in
recording order with the recording time as the arrival time. Not locked itself: the caller
serializes ``push``, ``flush`` and ``reset``.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional

from .clips import ClipAssembler
from .conversion import DEFAULT_MAX_INPUT_PIXELS, check_header, msg_to_tensor
from .drop_reasons import reason_key
from .rate_limit import RateLimiter
from .stamps import stamp_ns
from .synchronizer import Synchronizer
from ..model.processor import MIN_SIDE, image_size_problem

__all__ = ["CameraFrame", "IntakeSettings", "ConvertedFrame", "Intake", "IntakeOutput", "SetOut", "STAMP_SOURCES"]

STAMP_SOURCES = ("header", "arrival", "auto")

class CameraFrame(NamedTuple):
    """One camera's entry in a synchronized set: the uint8 (3, H, W) frame (or, in a clip set, the
    clip: a list of frames, oldest first) and the input message's header."""

    image: Any
    header: Any


@dataclass(frozen=True)
class IntakeSettings:
    """The rules of the intake; the node's parameters of the same meaning in brackets."""

    slop_ns: int                      # largest stamp spread within a set [sync.slop]
    queue_size: int = 10              # frames kept per camera waiting for a set [sync.queue_size]
    policy: str = "approximate_time"  # [sync.policy]
    reorder_ns: int = 0               # out-of-order stamps tolerated per camera [sync.reorder_tolerance]
    reset_ns: int = 1_000_000_000     # a stamp going back further resets the synchronizer [sync.reset_threshold]
    stamp_source: str = "header"      # header | arrival | auto [sync.stamp_source]
    clip_frames: int = 0              # 0: still images; K >= 2: clips of K frames [video.frames]
    clip_stride: int = 1              # [video.stride]
    max_rate: float = 0.0             # most sets per second on the arrival clock, 0: no cap [max_rate]
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS  # 0: no limit [max_input_pixels]

    def __post_init__(self) -> None:
        if self.stamp_source not in STAMP_SOURCES:
            raise ValueError(f"stamp source must be one of {', '.join(STAMP_SOURCES)}, got {self.stamp_source!r}")
        if self.clip_frames < 0 or self.clip_frames == 1:
            raise ValueError("clip frames must be 0 (still images) or at least 2")


class ConvertedFrame(NamedTuple):
    """A valid frame, ready for :meth:`Intake.push`."""

    index: int     # the camera
    stamp: int     # ns, from the stamp source
    arrival: int   # ns, on the caller's clock (the node's clock; offline: the recording time)
    frame: CameraFrame

    @property
    def size(self) -> tuple:
        return int(self.frame.image.shape[1]), int(self.frame.image.shape[2])


class SetOut(NamedTuple):
    """One set the synchronizer made: ``synced`` as it made it; ``ready``, the set for the model
    (with clips: the clip set, or None while a camera lacks the history, counted by the clip
    assembler); ``admitted``: ``ready`` is within ``max_rate`` (else counted ``rate_limit``)."""

    synced: Any
    ready: Any
    admitted: bool


@dataclass
class IntakeOutput:
    """What one :meth:`Intake.push` (or :meth:`Intake.flush`) gave: the sets made, in order, and
    whether the synchronizer reset on this frame (a stamp went back)."""

    sets: List[SetOut] = dataclasses.field(default_factory=list)
    reset: bool = False

    @property
    def admitted(self) -> List[Any]:
        """The sets for the model."""
        return [s.ready for s in self.sets if s.admitted]


class Intake:
    """Conversion, input checks, stamps, synchronizer, clips and the rate cap of ``cameras`` cameras."""

    def __init__(self, cameras: int, settings: IntakeSettings, device: Any = "cpu") -> None:
        self.settings = settings
        self.device = device
        self.sync = Synchronizer(cameras, settings.slop_ns, settings.queue_size, reset_threshold=settings.reset_ns,
                                 reorder_tolerance=settings.reorder_ns, policy=settings.policy)
        self.clips = (ClipAssembler(cameras, settings.clip_frames, settings.clip_stride, lag=settings.queue_size)
                      if settings.clip_frames else None)
        self.rate = RateLimiter(settings.max_rate)
        self.invalid: List[Dict[str, int]] = [collections.Counter() for _ in range(cameras)]
        self.rate_limited = 0

    # ------------------------------------------------------------------------- per frame
    def convert(self, index: int, msg: Any, arrival_ns: int) -> ConvertedFrame:
        """The message as a frame with its stamp; raises (and counts under :func:`reason_key`)
        when it is not a frame the model can take."""
        try:
            check_header(msg.header)
            image = msg_to_tensor(msg, self.device, min_size=MIN_SIDE,
                                  max_input_pixels=self.settings.max_input_pixels)
            problem = image_size_problem(int(image.shape[1]), int(image.shape[2]))
            if problem:
                raise ValueError(problem)
        except Exception as exc:  # ConversionError, and anything a decoder may raise
            self.count_invalid(index, exc)
            raise
        return ConvertedFrame(index, self.stamp_of(msg.header, arrival_ns), arrival_ns, CameraFrame(image, msg.header))

    def count_invalid(self, index: int, error: Any) -> str:
        """Count a frame that never became a frame (also one the caller could not deserialize)."""
        key = reason_key(error)
        self.invalid[index][key] += 1
        return key

    def stamp_of(self, header: Any, arrival_ns: int) -> int:
        source = self.settings.stamp_source
        if source == "arrival":
            return int(arrival_ns)
        stamp = stamp_ns(header.stamp)
        return int(arrival_ns) if stamp == 0 and source == "auto" else stamp

    def push(self, frame: ConvertedFrame) -> IntakeOutput:
        """Clip ring, synchronizer, clip sets, rate cap."""
        if self.clips is not None:
            self.clips.push(frame.index, frame.stamp, frame.frame.image)
        resets = self.sync.resets
        out = self._sets(self.sync.add(frame.index, frame.stamp, frame.frame), frame.arrival)
        out.reset = self.sync.resets != resets
        return out

    def flush(self) -> IntakeOutput:
        """At the end of a recording: the sets the synchronizer still holds (no rate cap)."""
        return self._sets(self.sync.flush(), None)

    def _sets(self, sync_sets: list, arrival_ns: Optional[int]) -> IntakeOutput:
        out = IntakeOutput()
        for synced in sync_sets:
            ready = synced if self.clips is None else self.clip_set(synced)
            admitted = ready is not None and (arrival_ns is None or self.rate.admit(arrival_ns))
            if ready is not None and not admitted:
                self.rate_limited += 1
            out.sets.append(SetOut(synced, ready, admitted))
        return out

    def clip_set(self, sync_set: Any) -> Any:
        """The set with each camera's :class:`CameraFrame` holding the clip that ends at its matched
        frame (the matched frame's header kept), or None while a camera's ring lacks the history."""
        clip_set = self.clips.assemble(sync_set)
        if clip_set is None:
            return None
        frames = tuple(CameraFrame(clip, f.header) for clip, f in zip(clip_set.items, sync_set.items))
        return dataclasses.replace(clip_set, items=frames)

    # ------------------------------------------------------------------------- control
    def set_max_rate(self, max_rate: float) -> None:
        self.rate.configure(max_rate)

    def reset(self) -> None:
        """Time went back or changed source: queued frames, clip rings and the rate schedule go."""
        self.sync.reset()
        self.rate.configure(self.rate.max_rate)
        if self.clips is not None:
            self.clips.reset()

    def stats(self) -> dict:
        """Synchronizer stats plus invalid frames by reason, rate-capped sets and clip counters."""
        out = dict(self.sync.stats())
        out["invalid"] = [dict(c) for c in self.invalid]
        out["rate_limited"] = self.rate_limited
        if self.clips is not None:
            out["clips"] = self.clips.stats()
        return out
