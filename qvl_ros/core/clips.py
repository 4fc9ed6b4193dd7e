"""Per-camera clip buffers: the clip of K frames that ends at each camera's matched frame.

Pure Python, no ROS or torch import; items are whatever the caller stores (the node's uint8
``(3, H, W)`` tensors), held by reference, never copied.

What a clip is
    With ``frames = K >= 2`` and ``stride = s >= 1``, the clip of camera n for a synchronized set
    is K frames of that camera, oldest first: the set's frame of camera n and the s-th, 2s-th,
    ... (K-1)s-th frame received before it. Its frame rate, for the model's time index, is
    ``(K - 1) / (last stamp - first stamp)``. A set whose camera does not yet hold (K-1)s frames
    before the matched one (start-up, just after a restart) has no clip: :meth:`ClipAssembler.assemble`
    returns None and counts it as ``incomplete``.

Bounded memory
    Each camera keeps a ring of ``(K - 1) * s + lag`` frames. ``lag`` is how many frames a
    camera's matched frame can be behind its newest one: frames wait in the synchronizer's
    queue, which holds at most ``queue_size`` frames per camera, so ``lag = queue_size`` covers
    every set the synchronizer can emit, whatever the cameras' rates.

Restarts (counted by reason; no clip reaches back across one)
    ``gap``: the time since the camera's previous frame exceeds the clip span, K * s times the
    camera's mean frame period since its last restart (measured from the second frame on). A
    clip across such a gap would show a jump, not motion.
    ``size_change``: a frame of another size than the previous one; a clip has one frame size.
    ``out_of_order``: a stamp not newer than the newest one held (time went back: bag loop,
    simulation reset); the ring is emptied. Frames in a clip are always in stamp order.
    After a gap or a size change the older frames stay in the ring until evicted, so a set the
    synchronizer emits late (it waited for the camera's next frame) still gets its clip.

:func:`clip_fps` checks a clip's stamps and gives its frame rate; it raises ``ValueError`` for
frames out of order (stamps not strictly increasing).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ClipBuffer", "ClipAssembler", "ClipSet", "clip_fps", "RESTART_REASONS"]

RESTART_REASONS: Tuple[str, ...] = ("gap", "out_of_order", "size_change")


def clip_fps(stamps_ns: Sequence[int]) -> float:
    """Frame rate of a clip from its frame stamps (ns, oldest first): (K - 1) / duration."""
    if len(stamps_ns) < 2:
        raise ValueError(f"a clip needs at least 2 frame stamps to have a frame rate, got {len(stamps_ns)}")
    for k in range(1, len(stamps_ns)):
        if stamps_ns[k] <= stamps_ns[k - 1]:
            raise ValueError(f"frames out of order: stamp {k} ({stamps_ns[k]} ns) is not after stamp {k - 1} "
                             f"({stamps_ns[k - 1]} ns); a clip's frames must have strictly increasing stamps")
    return (len(stamps_ns) - 1) / ((stamps_ns[-1] - stamps_ns[0]) * 1e-9)


def _size(item: Any):
    return tuple(getattr(item, "shape", ()))


class ClipBuffer:
    """The recent frames of one camera, for clips of ``frames`` frames every ``stride``-th frame."""

    def __init__(self, frames: int, stride: int = 1, lag: int = 1) -> None:
        if frames < 2:
            raise ValueError(f"a clip has at least 2 frames, got {frames}")
        if stride < 1 or lag < 1:
            raise ValueError(f"stride and lag must be >= 1, got {stride} and {lag}")
        self.frames, self.stride = int(frames), int(stride)
        self.capacity = (self.frames - 1) * self.stride + int(lag)
        self._ring: deque = deque(maxlen=self.capacity)  # (stamp, segment, item), stamps increasing
        self._segment = 0  # frames of one segment lie between two restarts; a clip stays in one
        self._seg_first, self._seg_count = 0, 0  # first stamp and frame count of the segment
        self.restarts: Dict[str, int] = {r: 0 for r in RESTART_REASONS}

    def __len__(self) -> int:
        return len(self._ring)

    def _restart_reason(self, stamp: int, item: Any) -> Optional[str]:
        if not self._ring:
            return None
        newest, _, last = self._ring[-1]
        if stamp <= newest:
            return "out_of_order"
        if _size(item) != _size(last):
            return "size_change"
        if self._seg_count >= 2:
            period = (newest - self._seg_first) / (self._seg_count - 1)
            if stamp - newest > self.frames * self.stride * period:
                return "gap"
        return None

    def push(self, stamp: int, item: Any) -> Optional[str]:
        """Add a frame (stamp in ns); returns the reason if it starts a new segment.

        After a gap or a size change the older frames stay (sets still pending in the
        synchronizer may end at them) but no clip reaches across; time going back empties
        the ring."""
        reason = self._restart_reason(stamp, item)
        if reason is not None:
            if reason == "out_of_order":
                self._ring.clear()
            self._segment += 1
            self._seg_count = 0
            self.restarts[reason] += 1
        if self._seg_count == 0:
            self._seg_first = stamp
        self._seg_count += 1
        self._ring.append((stamp, self._segment, item))
        return reason

    def clip(self, stamp: int) -> Optional[Tuple[Tuple[int, ...], List[Any]]]:
        """(stamps, items) of the clip ending at the frame stamped ``stamp``, oldest first; None
        when that frame is not held or fewer than (frames - 1) * stride frames of its segment
        precede it."""
        ring = self._ring
        for i in range(len(ring) - 1, -1, -1):
            if ring[i][0] == stamp:
                first = i - (self.frames - 1) * self.stride
                if first < 0 or ring[first][1] != ring[i][1]:
                    return None
                picked = [ring[j] for j in range(first, i + 1, self.stride)]
                return tuple(f[0] for f in picked), [f[2] for f in picked]
            if ring[i][0] < stamp:
                return None
        return None

    def clear(self) -> None:
        self._ring.clear()
        self._seg_count = 0


@dataclass(frozen=True, eq=False)
class ClipSet:
    """A synchronized set with one clip per camera (same interface as ``SyncSet`` for the batcher).

    ``stamps[n]`` is camera n's matched (last) frame stamp; ``items[n]`` its clip as a list of
    frames, oldest first; ``clip_stamps[n]`` the clip's frame stamps; ``fps[n]`` its frame rate."""

    stamps: Tuple[int, ...]
    items: Tuple[List[Any], ...]
    clip_stamps: Tuple[Tuple[int, ...], ...]
    fps: Tuple[float, ...]

    @property
    def stamp(self) -> int:
        return max(self.stamps)

    def __len__(self) -> int:
        return len(self.stamps)


class ClipAssembler:
    """One :class:`ClipBuffer` per camera; turns synchronized sets into :class:`ClipSet` s.

    Not locked: the caller serializes :meth:`push` and :meth:`assemble` (the node does both
    under the lock it holds around the synchronizer)."""

    def __init__(self, cameras: int, frames: int, stride: int = 1, lag: int = 1) -> None:
        self.buffers = [ClipBuffer(frames, stride, lag) for _ in range(cameras)]
        self.incomplete = 0
        self.sets = 0

    def push(self, index: int, stamp: int, item: Any) -> Optional[str]:
        return self.buffers[index].push(stamp, item)

    def assemble(self, sync_set: Any) -> Optional[ClipSet]:
        """The clips ending at the set's frames, or None (counted) if a camera lacks history."""
        clips = [buf.clip(stamp) for buf, stamp in zip(self.buffers, sync_set.stamps)]
        if any(c is None for c in clips):
            self.incomplete += 1
            return None
        self.sets += 1
        return ClipSet(tuple(sync_set.stamps), tuple(c[1] for c in clips), tuple(c[0] for c in clips),
                       tuple(clip_fps(c[0]) for c in clips))

    def reset(self) -> None:
        for buf in self.buffers:
            buf.clear()

    def stats(self) -> dict:
        """Restarts per camera and reason, sets without a full clip, frames held and the bound."""
        return {"restarts": [dict(b.restarts) for b in self.buffers], "incomplete": self.incomplete,
                "sets": self.sets, "held": [len(b) for b in self.buffers],
                "capacity": self.buffers[0].capacity if self.buffers else 0}
