"""Peak resident memory of one call, in this process (Linux /proc).

The kernel's peak-RSS mark (VmHWM) is reset through /proc/self/clear_refs after freed heap is
given back to the OS (malloc_trim), so the peak a call reaches above what the process held
before it is VmHWM after the call minus VmRSS before it.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path


def peak_rss_reset() -> int:
    """Give freed heap back to the OS, reset the kernel's peak-RSS mark of this process; return
    current RSS in bytes. The peak of a call is then VmHWM after it minus this."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    reset_peak()
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_mb(fn) -> float:
    """Peak resident memory a call adds above what the process held before it, in MB."""
    gc.collect()
    base = peak_rss_reset()
    fn()
    return max(0, _status("VmHWM") - base) / 2 ** 20


def reset_peak() -> None:
    """Reset the process's peak-RSS mark without touching the heap (safe while threads work)."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        pass


def process_peak_mb() -> float:
    """The process's peak RSS since the last reset, in MB."""
    return _status("VmHWM") / 2 ** 20
