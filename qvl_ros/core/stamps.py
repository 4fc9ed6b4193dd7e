"""Stamps as integer nanoseconds, the one time unit of the pipeline.

Works on any object with ``sec`` and ``nanosec`` fields (rclpy's and rosbags'
``builtin_interfaces/Time``), so the node and the offline tools share one conversion.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

NS_PER_S = 1_000_000_000
# The stamps a camera header may carry: 0 <= t <= MAX_STAMP_NS, nanosec < 1e9. The top leaves a
# day below builtin_interfaces/Time's largest second (int32, 2**31 - 1: January 2038), more than
# any offset the pipeline adds to a stamp (the largest, sync.reset_threshold, is at most an
# hour), so no stamp computed from an accepted one wraps the published Time (to 1901) and the
# diagnostics' latency (node clock minus stamp) stays below 2**31 s in size.
STAMP_HEADROOM_S = 86_400
MAX_STAMP_NS = (2**31 - 1 - STAMP_HEADROOM_S) * NS_PER_S


def stamp_ns(t: Any) -> int:
    """``builtin_interfaces/Time`` (either library's) -> integer nanoseconds."""
    return int(t.sec) * NS_PER_S + int(t.nanosec)


def stamp_problem(t: Any) -> Optional[str]:
    """Why a ``builtin_interfaces/Time`` is not a stamp the pipeline takes (negative, a
    nanosecond field of a second or more, beyond :data:`MAX_STAMP_NS`), or None."""
    sec, nanosec = int(t.sec), int(t.nanosec)
    if sec < 0 or nanosec < 0:
        return f"stamp out of range: negative ({sec} s {nanosec} ns)"
    if nanosec >= NS_PER_S:
        return f"stamp out of range: nanosec {nanosec} is not below 1e9"
    if sec * NS_PER_S + nanosec > MAX_STAMP_NS:
        return f"stamp out of range: {sec} s is beyond {MAX_STAMP_NS // NS_PER_S} s (int32 Time with headroom)"
    return None


def sec_nanosec(ns: int) -> Tuple[int, int]:
    """Integer nanoseconds -> (sec, nanosec) with 0 <= nanosec < 1e9, as a Time message holds them."""
    return int(ns // NS_PER_S), int(ns % NS_PER_S)


def format_stamp(ns: int) -> str:
    """Integer nanoseconds as ``sec.nanosec`` with nine digits (logs, summaries)."""
    sec, nanosec = sec_nanosec(ns)
    return f"{sec}.{nanosec:09d}"


def format_stamps(stamps_ns: Sequence[int]) -> str:
    """``[s.nnnnnnnnn, ...]``: a set's stamps in a log line."""
    return "[" + ", ".join(format_stamp(s) for s in stamps_ns) + "]"
