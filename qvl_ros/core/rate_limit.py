"""A cap on the number of sets per second (the node's ``max_rate``), on a clock of the caller's.

Pure Python, no ROS import. The node asks :meth:`RateLimiter.admit` with its clock's time (ROS
time, so sim time under ``use_sim_time``) for every synchronized set; admitted sets go to the
model, the others are dropped and counted by the caller.

Rule (a virtual scheduler, as a token bucket of one token): with period ``T = 1 / max_rate``
and a theoretical next slot ``due``, a set arriving at ``t`` is admitted when
``t >= due - T / 2``; then ``due = max(due, t) + T``. Over any long run at most
``max_rate`` sets per second pass (plus one), and a camera stream exactly at ``max_rate`` with
jitter below half a period is never thinned. ``max_rate <= 0`` admits everything. Time going
back (bag loop) restarts the schedule.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, max_rate: float = 0.0) -> None:
        self._period_ns = 0
        self._due: Optional[int] = None
        self._last: Optional[int] = None
        self.admitted = 0
        self.rejected = 0
        self.configure(max_rate)

    def configure(self, max_rate: float) -> None:
        """Set the cap (sets per second; <= 0: none); the schedule restarts."""
        rate = float(max_rate)
        self._period_ns = int(round(1e9 / rate)) if rate > 0 else 0
        self._due = None

    @property
    def max_rate(self) -> float:
        return 1e9 / self._period_ns if self._period_ns else 0.0

    def admit(self, now_ns: int) -> bool:
        """Whether a set arriving at ``now_ns`` (integer nanoseconds) may pass."""
        if self._last is not None and now_ns < self._last:
            self._due = None  # time went back: a new timeline
        self._last = now_ns
        if self._period_ns and self._due is not None and now_ns < self._due - self._period_ns // 2:
            self.rejected += 1
            return False
        if self._period_ns:
            self._due = max(self._due if self._due is not None else now_ns, now_ns) + self._period_ns
        self.admitted += 1
        return True
