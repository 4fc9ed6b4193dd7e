"""Per-camera estimate of frames lost before the node's callback saw them.

Frames can vanish before a subscription callback runs: dropped by the middleware (a
best-effort sample lost on the wire or by a full receive buffer) or overwritten in the
subscription's KEEP_LAST queue while the executor was busy. Nothing downstream can count them,
so two estimates are kept per camera:

* ``rmw_lost``: what the middleware reports through the subscription's message-lost event
  (rclpy ``SubscriptionEventCallbacks(message_lost=...)``; Fast DDS reports lost samples of
  best-effort readers; KEEP_LAST overwrites are not reported by any middleware);
* ``gap_lost``: gaps in the camera's own rate, from header stamps: the period is the median of
  the last ``window`` stamp differences, and a difference of ``d > gap_factor * period`` counts
  ``round(d / period) - 1`` lost frames, taken back when the next frame comes early enough to
  show that the frame was late, not lost (a camera timer under load). Differences longer than
  ``max_gap_s`` (a camera that
  paused or restarted), stamps going back, and zero stamps are not counted as loss.

``lost`` is the larger of the two (a frame lost in the middleware is also a gap), and
``loss_ratio`` is ``lost / (received + lost)``. Plain Python (no ROS import); the node feeds it
from its callbacks and adds :meth:`InputLossEstimator.status` to ``/diagnostics``.
"""
from __future__ import annotations

import collections
import statistics
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["InputLossEstimator"]

OK, WARN = 0, 1


class _Cam:
    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.received = 0
        self.last: Optional[int] = None
        self.deltas: collections.deque = collections.deque(maxlen=window)
        self.period: Optional[float] = None
        self.gap_lost = 0
        self.rmw_lost = 0
        self.pauses = 0
        self.last_gap: Optional[Tuple[int, int]] = None  # (frames counted, interval) of the last gap
        self.rmw_supported: Optional[bool] = None


class InputLossEstimator:
    """Counts frames each camera sent that never reached the callback (see the module doc).

    Args:
        camera_names: in the node's camera order.
        window: stamp differences the period estimate uses (their median).
        gap_factor: a difference above this many periods is a gap.
        max_gap_s: a longer difference is a pause, not loss.
        min_deltas: differences needed before gaps are counted.
    """

    def __init__(self, camera_names: Sequence[str], *, window: int = 64, gap_factor: float = 1.5,
                 max_gap_s: float = 5.0, min_deltas: int = 8) -> None:
        self._cams = [_Cam(str(n), int(window)) for n in camera_names]
        self._gap_factor = float(gap_factor)
        self._max_gap_ns = int(max_gap_s * 1e9)
        self._min_deltas = int(min_deltas)
        self._lock = threading.Lock()
        self._reported: List[int] = [0] * len(self._cams)

    def frame(self, index: int, stamp_ns: int) -> None:
        """A message of camera ``index`` reached the callback, with this header stamp (ns)."""
        with self._lock:
            cam = self._cams[index]
            cam.received += 1
            if stamp_ns <= 0:
                return
            last, cam.last = cam.last, (stamp_ns if cam.last is None else max(cam.last, stamp_ns))
            if last is None:
                return
            d = stamp_ns - last
            if d < -self._max_gap_ns:  # the camera's time went back (restart, bag loop)
                cam.last = stamp_ns
                return
            if d <= 0:
                return
            if d > self._max_gap_ns:
                cam.pauses += 1
                return
            late = cam.last_gap
            cam.last_gap = None
            if late is not None:  # was the previous gap a late frame rather than a lost one?
                counted, d_prev = late
                both = max(0, round((d_prev + d) / cam.period) - 2)  # lost over both intervals
                cam.gap_lost -= max(0, counted - both)
            if cam.period is not None and d > self._gap_factor * cam.period:
                counted = max(0, round(d / cam.period) - 1)
                cam.gap_lost += counted
                cam.last_gap = (counted, d) if counted else None
            cam.deltas.append(d)
            if len(cam.deltas) >= self._min_deltas:
                cam.period = float(statistics.median(cam.deltas))

    def middleware_lost(self, index: int, count: int) -> None:
        """The middleware reported ``count`` more lost messages on camera ``index``."""
        with self._lock:
            self._cams[index].rmw_lost += max(0, int(count))

    def middleware_support(self, index: int, supported: bool) -> None:
        """Whether the middleware delivers message-lost events for camera ``index``."""
        with self._lock:
            self._cams[index].rmw_supported = bool(supported)

    def snapshot(self) -> List[Dict[str, Any]]:
        with self._lock:
            out = []
            for c in self._cams:
                lost = max(c.gap_lost, c.rmw_lost)
                total = c.received + lost
                out.append({"name": c.name, "received": c.received, "gap_lost": c.gap_lost,
                            "rmw_lost": c.rmw_lost, "rmw_supported": c.rmw_supported, "lost": lost,
                            "loss_ratio": lost / total if total else 0.0, "pauses": c.pauses,
                            "period_s": c.period * 1e-9 if c.period else None})
            return out

    def status(self, node_name: str) -> Tuple[int, str, str, List[Tuple[str, str]]]:
        """A ``/diagnostics`` status: WARN while frames went missing since the previous call."""
        snap = self.snapshot()
        new = [c["lost"] - r for c, r in zip(snap, self._reported)]
        self._reported = [c["lost"] for c in snap]
        level = WARN if any(n > 0 for n in new) else OK
        parts = [f"{c['name']} {c['lost']} ({100 * c['loss_ratio']:.1f}%)" for c in snap]
        message = "frames lost before the callback: " + ", ".join(parts)
        values: List[Tuple[str, str]] = []
        for c in snap:
            p = c["name"]
            rmw = "unsupported" if c["rmw_supported"] is False else str(c["rmw_lost"])
            period = "" if c["period_s"] is None else f"{c['period_s'] * 1e3:.2f}"
            values += [(f"{p}.lost", str(c["lost"])), (f"{p}.loss_ratio", f"{c['loss_ratio']:.4f}"),
                       (f"{p}.gap_lost", str(c["gap_lost"])), (f"{p}.rmw_lost", rmw),
                       (f"{p}.received", str(c["received"])), (f"{p}.period_ms", period),
                       (f"{p}.pauses", str(c["pauses"]))]
        return level, f"{node_name}: input loss", message, values
