"""The set source of an extraction: recordings in, synchronized sets out, in recording order.

The camera messages are read from :class:`qvl_ros.offline.bag_io.CameraBags` and go through the
node's intake (:class:`qvl_ros.core.intake.Intake`) with the recording time as the arrival time.
A :class:`Window` says which sets a run owns (a shard's warm-up sets are kept as signatures);
:class:`ReadAhead` runs the source in a thread ahead of the model."""
from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from .options import ExtractConfig, intake_settings

__all__ = ["SetSource", "Window", "ReadAhead", "FLUSH_BIRTH", "signature", "batch_window_index"]

class SetSource:
    """Reads, converts and synchronizes the camera frames; iterating yields SyncSets in order."""

    def __init__(self, bags, cfg: ExtractConfig, device, start_ns=None, stop_ns=None,
                 stopped: Callable[[], bool] = lambda: False, window: "Window | None" = None) -> None:
        self.bags = bags
        self.cfg = cfg
        self.device = device
        self.start_ns, self.stop_ns = start_ns, stop_ns
        self.stopped = stopped
        self.window = dataclasses.replace(window) if window is not None else Window()
        # signatures of the last window.warmup_keep sets born before window.own_from_ns (not yielded)
        self.warmup_sets: collections.deque = collections.deque(maxlen=self.window.warmup_keep)
        # signatures of the last window.tail_keep sets yielded
        self.tail_sets: collections.deque = collections.deque(maxlen=self.window.tail_keep)
        from ..core.intake import Intake

        n = len(bags.cameras)
        # the node's intake: conversion, input checks, stamps, synchronizer, clips, rate cap
        self.intake = Intake(n, intake_settings(cfg), device)
        self.sync, self.clips = self.intake.sync, self.intake.clips
        self.frames = [0] * n
        self.failed = [0] * n
        self.failures: list[tuple[str, int, str]] = []
        self.finished = False  # the whole requested range was read

    @property
    def frames_read(self) -> int:
        return sum(self.frames)

    def _fail(self, k: int, stamp_ns: int, reason: str) -> None:
        self.failed[k] += 1
        self.failures.append((self.bags.cameras[k].topic, stamp_ns, reason))

    def __iter__(self) -> Iterator:
        """(birth ns, set): each synchronized set with the recording time of the frame that
        completed it (:data:`FLUSH_BIRTH` for the sets flushed at the end of the recordings). The
        recording time is the frame's arrival time (``--stamps bag`` synchronizes on it)."""
        intake, bags = self.intake, self.bags
        for k, rec_ns, raw in bags.records(self.start_ns, self.stop_ns):
            if self.stopped():
                return
            if rec_ns >= self.window.own_from_ns and not self.window.owning:
                self.window.owning = True
            self.frames[k] += 1
            try:
                msg = bags.deserialize(k, raw)
            except ValueError as exc:
                intake.count_invalid(k, exc)
                self._fail(k, rec_ns, str(exc))
                continue
            try:
                frame = intake.convert(k, msg, rec_ns)  # counts an invalid frame by its reason
            except Exception as exc:  # as the node: the frame is dropped, the run goes on
                self._fail(k, intake.stamp_of(msg.header, rec_ns), str(exc))
                continue
            yield from self._sets(intake.push(frame).sets, rec_ns)
        self.finished = True
        if self.window.flush_at_end:
            self.window.owning = True
            yield from self._sets(intake.flush().sets, FLUSH_BIRTH)

    def _sets(self, made, birth: int) -> Iterator:
        for s in made:
            if not self.window.owning:
                self.warmup_sets.append(signature(birth, s.synced, s.ready))
                continue
            if self.window.tail_keep:
                self.tail_sets.append(signature(birth, s.synced, s.ready))
            if s.admitted:
                yield birth, s.ready


FLUSH_BIRTH = (1 << 63) - 1  # birth of the sets flushed after the last frame


@dataclass
class Window:
    """Which of the synchronized sets a run owns: those born (completed by a frame recorded) at
    or after ``own_from_ns``; earlier ones are synchronization warm-up, recorded as signatures
    only. ``flush_at_end``: the read range ends where the recordings (or --end) end, so the sets
    the synchronizer still holds are flushed there, as one pass over everything would."""

    own_from_ns: int = -(1 << 63)
    tail_keep: int = 0  # signatures are kept of this many of the last owned sets
    warmup_keep: int | None = None  # and of this many of the last warm-up sets (None: all)
    flush_at_end: bool = True
    owning: bool = False


def signature(birth: int, s, clip_set) -> list:
    """What identifies a set across runs: its birth, its stamps and its clips' stamps (None for a
    set without a full clip)."""
    clips = None if clip_set is None else [list(c) for c in getattr(clip_set, "clip_stamps", ())]
    return [int(birth), [int(t) for t in s.stamps], clips]


def batch_window_index(birth: int, window_ns: int) -> int:
    """The batch window a set born at ``birth`` belongs to (all one window when ``window_ns`` is 0)."""
    if window_ns <= 0:
        return 0
    return -1 if birth == FLUSH_BIRTH else birth // window_ns


_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ReadAhead:
    """Runs an iterator in a thread, `depth` items ahead of the consumer.

    ``torch_threads``: intra-op threads for torch work done in that thread (None: unchanged).
    On a CPU the model already uses every core; a second OpenMP team for the frame
    conversions would oversubscribe them, so the reading thread converts with one thread.
    """

    def __init__(self, source, depth: int, torch_threads: int | None = None) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._halt = threading.Event()
        self._torch_threads = torch_threads
        self._thread = threading.Thread(target=self._run, args=(source,), name="qvl-extract-read", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source) -> None:
        saved = None
        if self._torch_threads is not None:
            import torch

            # Sets this thread's OpenMP/MKL thread count (threads that already run keep theirs)
            # and torch's default for threads started later, which is restored below.
            saved = torch.get_num_threads()
            torch.set_num_threads(self._torch_threads)
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer
            self._put(_Raised(exc))
        finally:
            if saved is not None:
                import torch

                torch.set_num_threads(saved)
        self._put(_END)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item

    def close(self) -> int:
        """Stop the thread; return how many produced items were never consumed."""
        self._halt.set()
        left = 0
        while self._thread.is_alive() or not self._queue.empty():
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is not _END and not isinstance(item, _Raised):
                left += 1
        self._thread.join()
        return left
