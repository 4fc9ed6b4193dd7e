"""What an extraction shows on its stream: the progress line, the end-of-run summary, and the
signal handling that turns Ctrl-C / SIGTERM into "finish the batch in flight, then close"."""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Callable

from ..core.stamps import format_stamp as fmt_stamp

__all__ = ["Progress", "StopOnSignal", "format_summary", "fmt_duration", "fmt_stamp", "DROP_TEXT"]


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """One status line on a stream: frames read, sets written, sets/s and ETA.

    ``mode``: "bar" redraws one line (a terminal), "lines" prints a line per update at most
    every ``interval`` seconds (logs, pipes), "none" prints nothing; "auto" picks "bar" on a
    terminal and "lines" (every 10 s) otherwise.
    """

    def __init__(self, total_frames: int, mode: str = "auto", interval: float | None = None,
                 stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.mode = ("bar" if tty else "lines") if mode == "auto" else mode
        self.interval = interval if interval is not None else (0.2 if self.mode == "bar" else 10.0)
        self.total = max(0, int(total_frames))
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self._width = 0
        self.prefix: Callable[[], str] | None = None  # text put before each line (a sharded run's shard count)

    def line(self, frames: int, sets: int) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = sets / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, frames / self.total)
            eta = elapsed * (1 - frac) / frac if frac > 0 else math.inf
            done = f"frames {frames}/{self.total} ({100 * frac:3.0f}%)"
        else:
            eta, done = math.inf, f"frames {frames}"
        head = self.prefix() if self.prefix is not None else ""
        return (f"{head}{done} | sets {sets} | {rate:.1f} sets/s | elapsed {fmt_duration(elapsed)} "
                f"| ETA {fmt_duration(eta)}")

    def update(self, frames: int, sets: int, force: bool = False) -> None:
        if self.mode == "none":
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        text = self.line(frames, sets)
        if self.mode == "bar":
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, frames: int, sets: int) -> None:
        if self.mode == "none":
            return
        self.update(frames, sets, force=True)
        if self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()


class StopOnSignal:
    """First SIGINT/SIGTERM sets `stop` (the run ends after the batch in flight); a second
    SIGINT raises KeyboardInterrupt, unless `closing` is set (the files are being closed).
    Handlers are restored on exit."""

    def __init__(self, stop: threading.Event, enabled: bool, stream) -> None:
        self.stop = stop
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.stream = stream
        self.signum: int | None = None
        self.closing = False
        self._saved: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.closing:
            if self.signum is None:
                self.signum = signum
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            self.stop.set()
            name = signal.Signals(signum).name
            self.stream.write(f"\n{name}: finishing the batch in flight, then closing the output "
                              f"(Ctrl-C again to stop at once)\n")
            self.stream.flush()

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------- extraction


DROP_TEXT = {
    "unmatched": "no frame of every other camera within the slop",
    "too_old": "stamp not newer than the frame this camera last contributed",
    "queue_full": "waited longer than --queue-size frames for a match",
    "time_reset": "time jumped back (recordings restart or overlap)",
}


def format_summary(report, max_failures: int = 10) -> str:
    """The human-readable end-of-run summary of an :class:`qvl_ros.offline.engine.ExtractReport`."""
    lines = []
    state = "done"
    if report.interrupted is not None:
        state = f"interrupted by {signal.Signals(report.interrupted).name}"
    elif report.error:
        state = "stopped by an error"
    written = f"{report.sets_written} set{'s' if report.sets_written != 1 else ''} written"
    if report.captions_written:
        written += f" (+{report.captions_written} captions)"
    if getattr(report, "detections_written", 0):
        written += f" (+{report.detections_written} detection arrays, {report.objects_detected} objects)"
    lines.append(f"{state}: {written} to {report.output} in {report.elapsed_s:.1f} s "
                 f"({report.sets_per_s:.2f} sets/s, model {report.model}, device {report.device})")
    if report.export is not None:
        lines.append(f"features exported to {report.export}")
    if report.error:
        lines.append(f"error: {report.error}")
    if not report.output_complete:
        lines.append(f"OUTPUT {report.output} could not be closed: it is incomplete (marked by "
                     f"EXTRACTION_INCOMPLETE); rerun with --force to replace it")
    for damage in report.damaged:
        lines.append(f"input damage, skipped: {damage}")
    header = ("camera", "topic", "type", "frames", "used", "failed", "unmatched", "other drops", "left over")
    rows = []
    for cam in report.cameras:
        other = {r: v for r, v in cam.dropped.items() if r != "unmatched"}
        left = cam.pending + cam.in_unwritten_sets
        failed = str(cam.failed) + (f" ({', '.join(f'{r} {v}' for r, v in cam.invalid.items())})" if cam.invalid else "")
        rows.append((cam.name, cam.topic, cam.msgtype, str(cam.frames), str(cam.used), failed,
                     str(cam.dropped.get("unmatched", 0)),
                     ", ".join(f"{r} {v}" for r, v in other.items()) or "0", str(left)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in [header] + rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    reasons = {r for cam in report.cameras for r in cam.dropped}
    for reason in ("unmatched", "too_old", "queue_full", "time_reset"):
        if reason in reasons:
            lines.append(f"  {reason}: {DROP_TEXT[reason]}")
    if any(cam.pending for cam in report.cameras):
        lines.append("  left over: frames still waiting for partners when reading stopped")
    if report.sets_unwritten:
        lines.append(f"  {report.sets_unwritten} synchronized set(s) not written because the run stopped")
    if report.clips_incomplete:
        lines.append(f"  {report.clips_incomplete} synchronized set(s) not written: a camera did not yet hold "
                     f"a full clip (start of the recording, or after a clip restart)")
    restarts = {name: r for name, r in report.clip_restarts.items() if r}
    if restarts:
        lines.append("  clip restarts: " + "; ".join(
            f"{name} " + ", ".join(f"{k} {v}" for k, v in r.items()) for name, r in restarts.items()))
    if report.sets_written == 0 and not report.error and report.interrupted is None and \
            all(cam.frames for cam in report.cameras):
        lines.append("  no synchronized set found: are the cameras' stamps within --slop of each other? "
                     "(try a larger --slop, or --stamps bag when header stamps are unset)")
    if report.failures:
        lines.append(f"frames that could not be converted ({len(report.failures)}), skipped:")
        for topic, stamp, reason in report.failures[:max_failures]:
            lines.append(f"  {topic} at {fmt_stamp(stamp)}: {reason}")
        if len(report.failures) > max_failures:
            lines.append(f"  ... and {len(report.failures) - max_failures} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
# (option, ExtractConfig field, argparse keywords): options whose default and rule are a node
# parameter's (PARAM_OF) or that a parameter file can give (topics, names, model, device)
