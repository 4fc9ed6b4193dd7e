"""Stamps as integer nanoseconds, the one time unit of the pipeline.

Works on any object with ``sec`` and ``nanosec`` fields (rclpy's and rosbags'
``builtin_interfaces/Time``), so the node and the offline tools share one conversion.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

NS_PER_S = 1_000_000_000


def stamp_ns(t: Any) -> int:
    """``builtin_interfaces/Time`` (either library's) -> integer nanoseconds."""
    return int(t.sec) * NS_PER_S + int(t.nanosec)


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
