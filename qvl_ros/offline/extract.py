"""Offline feature extraction: camera rosbag2 recordings in, a feature bag (and arrays) out.

    qvl-ros extract INPUT [INPUT ...] --out OUTPUT --topics /cam0/image_raw /cam1/image_raw ...
    python -m qvl_ros.offline.extract INPUT ... --out OUTPUT --topics ...

Reads the camera topics of one or more rosbag2 recordings (sqlite3 or mcap; several inputs are
merged in recording-time order), converts every frame with :mod:`qvl_ros.core.conversion`, matches
frames into synchronized sets with :class:`qvl_ros.core.synchronizer.Synchronizer` (the node's own
components), runs the model on ``--batch`` sets at a time and writes OUTPUT, an mcap rosbag2 with
one ``/qvl/features`` (qvl_ros/msg/VisionFeatures) message per set and, with ``--caption``, one
``/qvl/caption`` (qvl_ros/msg/Caption) message per set. A message's recording time is the set's
stamp (its newest camera stamp). Message definitions are stored in the bag. ``--export DIR``
also writes the features as safetensors shards (see :mod:`qvl_ros.offline.export`).

Nothing is dropped for lack of time: every set the recordings contain is processed, in stamp
order, with batches of fixed composition, so two runs give identical output. Frames that fit no
set, and frames that cannot be decoded (a corrupt JPEG, an unknown encoding), are counted and
listed in the summary at the end.

Interrupting (Ctrl-C or SIGTERM) finishes the batch the model is working on, writes it, and
closes OUTPUT (and the export) so that they hold every set finished so far as a valid bag; a
second Ctrl-C stops at once but still closes the files. An error during the run (a model or
read failure, a full disk) also closes OUTPUT as a valid bag with every set written so far.
Until it is closed, OUTPUT holds a marker file, ``EXTRACTION_INCOMPLETE``: after SIGKILL or a
crash of the process it stays there, says what happened, and lets ``--force`` remove the
directory (:mod:`qvl_ros.offline.output_guard`, which also keeps the space closing needs on a
full disk). A damaged chunk of an mcap input is reported with its file and byte offset and
skipped; the run goes on with the next chunk.

Every option, the inputs, the topics and OUTPUT (can it be created?) are checked before the
model loads.

Exit status: 0 done; 1 an error during the run (OUTPUT is closed and holds what was written,
or, if even closing failed, keeps its marker); 2 a problem found before starting (bad or
out-of-range option, missing input, topic not in the recordings or without messages, topic of
another type, unreadable recording, --start past the end, model that cannot be loaded, OUTPUT
exists without --force or cannot be created); 3 the run finished but produced no set (no
matching stamps; pass --allow-empty to make that a success); 130 / 143 interrupted by SIGINT /
SIGTERM (OUTPUT is complete up to that point; 130 also for Ctrl-C while the model loads,
before anything was written).

The same run as a function: :func:`extract` with an :class:`ExtractConfig`, returning an
:class:`ExtractReport`.

With ``--workers N`` and/or ``--ray [ADDRESS]`` the run is sharded instead: OUTPUT becomes a
shards directory, filled shard by shard (resumable, on Ray workers or in this process), and
``qvl-ros merge`` makes it the bag this command writes in one pass (:mod:`qvl_ros.offline.fleet`,
:mod:`qvl_ros.offline.shards`, :mod:`qvl_ros.offline.merge`).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..core.model_call import ModelRequest, call_model
from ..core.params import BY_NAME as P
from ..core.params import ParamError, read_params_file
from ..core.params import slop_ns as resolve_slop_ns

__all__ = ["ExtractConfig", "ExtractReport", "ExtractError", "extract", "add_arguments", "run_cli", "main"]

DEFAULT_PROMPT = P["prompt"].default
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_EMPTY = 0, 1, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class ExtractError(Exception):
    """A problem found before extraction starts (bad input, topic, model or output)."""


@dataclass
class ExtractConfig:
    """Everything one extraction run needs; field docs match the command-line options."""

    inputs: Sequence[str | os.PathLike]
    output: str | os.PathLike
    topics: Sequence[str]
    camera_names: Sequence[str] | None = None  # default: derived from the topics
    model: str | None = None  # checkpoint directory, cached HF id, "tiny" / None = bundled tiny model
    device: str = "auto"
    dtype: str = "auto"
    min_pixels: int | None = None
    max_pixels: int | None = None
    # Defaults: the node's (the parameter table, qvl_ros.core.params; the node parameter in brackets).
    slop: float = P["sync.slop"].default  # seconds; -1: a third of the slowest expected frame period [sync.slop]
    batch: int = P["batch.max_size"].default  # [batch.max_size]
    prompt: str = DEFAULT_PROMPT
    features: Sequence[str] = ("vision", "hidden")
    caption: bool = False
    max_new_tokens: int = P["caption.max_new_tokens"].default
    start: str | float | None = None  # bag time in seconds, or "+S" = S seconds after the start
    end: str | float | None = None
    stamps: str = "header"  # "header": camera header stamps; "bag" (= "arrival"): recording times; "auto"
    queue_size: int = P["sync.queue_size"].default  # frames kept per camera while waiting for a match
    reorder: float = P["sync.reorder_tolerance"].default  # seconds of out-of-order stamps tolerated per camera
    policy: str = P["sync.policy"].default  # approximate_time | max_sets
    reset_threshold: float = P["sync.reset_threshold"].default  # seconds a stamp may go back before a reset
    max_rate: float = P["max_rate"].default  # most sets per second of recording time; 0: no cap
    expected_rates: Sequence[float] = (0.0,)  # Hz per camera (or one for all): the default slop [diagnostics.]
    frame_id: str = ""
    clip_frames: int = 0  # 0: still images; K >= 2: per camera, a clip of K frames ending at the matched one
    clip_stride: int = 1  # the clip takes every S-th frame of its camera
    force: bool = False
    export: str | os.PathLike | None = None
    shard_mb: float = 512.0
    # Batches read and decoded ahead in a thread; None: 0 on a CPU (the model keeps every core
    # busy, and the thread's Python work would hold up the model's thread on the GIL), 2 on a GPU.
    prefetch: int | None = None
    reader_threads: int | None = 1  # torch threads of the reading thread on a CPU device (None: torch's)
    handle_signals: bool = True  # SIGINT/SIGTERM finish the batch in flight, then stop
    max_input_pixels: int | None = P["max_input_pixels"].default  # largest declared frame size; 0: no limit
    allow_empty: bool = False  # an output without sets is a success (otherwise: exit 3)
    announce_model_load: bool = False  # write "loading model ..." on the stream before loading
    # A batch never holds sets born (completed by a frame recorded) in two different windows of
    # this many seconds of absolute recording time. Shards of a sharded run are cut on this grid,
    # so every batch of a sharded run is a batch of the single-process run too (same inputs to
    # the model, hence the same bytes out, on any device). 0: batches cross windows freely.
    batch_window: float = 10.0


@dataclass
class CameraReport:
    topic: str
    name: str
    msgtype: str
    frames: int = 0  # read from the recordings
    used: int = 0  # part of a written set
    failed: int = 0  # could not be deserialized or converted, or the model cannot take them
    invalid: dict[str, int] = field(default_factory=dict)  # those by reason (the node's invalid-frame keys)
    dropped: dict[str, int] = field(default_factory=dict)  # synchronizer drops by reason
    pending: int = 0  # still waiting for partners when reading stopped
    in_unwritten_sets: int = 0  # matched, but the run stopped before their batch


@dataclass
class ExtractReport:
    output: Path
    export: Path | None
    cameras: list[CameraReport]
    sets_written: int = 0
    captions_written: int = 0
    sets_unwritten: int = 0  # synchronized but not written (interrupted or failed run)
    clips_incomplete: int = 0  # with clips: sets before every camera held a full clip (not written)
    clip_restarts: dict = field(default_factory=dict)  # with clips: {camera: {reason: count}}
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # (topic, stamp ns, reason)
    interrupted: int | None = None  # the signal number that stopped the run
    error: str | None = None  # what stopped the run early, if anything did
    reached_end: bool = False  # every frame of the requested range was read
    elapsed_s: float = 0.0  # from the first frame read to OUTPUT closed
    model: str = ""
    device: str = ""
    output_complete: bool = False  # the bag was closed (valid); False: it keeps the incomplete marker
    damaged: list[str] = field(default_factory=list)  # input chunks that could not be read, skipped

    @property
    def sets_per_s(self) -> float:
        return self.sets_written / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ------------------------------------------------------------------------------------- helpers
def _parse_time(spec: str | float | None, bag_start_ns: int, what: str) -> int | None:
    """Seconds of bag time -> ns; "+S" means S seconds after the start of the recordings."""
    if spec is None or spec == "":
        return None
    text = str(spec).strip()
    relative = text.startswith("+")
    try:
        seconds = Decimal(text[1:] if relative else text)
    except InvalidOperation:
        raise ExtractError(f"--{what} {spec!r} is not a number of seconds") from None
    if not seconds.is_finite():
        raise ExtractError(f"--{what} {spec!r} is not a finite number of seconds")
    ns = int(seconds * 1_000_000_000)
    return bag_start_ns + ns if relative else ns


def intake_settings(cfg: ExtractConfig):
    """The node's intake rules (:class:`qvl_ros.core.intake.IntakeSettings`) from the extraction
    options (``--stamps bag``: the recording time is the arrival time)."""
    from ..core.intake import IntakeSettings  # torch: not imported by a Ray driver, which never converts

    kw = {} if cfg.max_input_pixels is None else {"max_input_pixels": int(cfg.max_input_pixels)}
    return IntakeSettings(slop_ns=resolve_slop_ns(cfg.slop, cfg.expected_rates), queue_size=int(cfg.queue_size),
                          policy=cfg.policy, reorder_ns=int(round(cfg.reorder * 1e9)),
                          reset_ns=int(round(cfg.reset_threshold * 1e9)),
                          stamp_source="arrival" if cfg.stamps == "bag" else cfg.stamps,
                          clip_frames=int(cfg.clip_frames), clip_stride=int(cfg.clip_stride),
                          max_rate=float(cfg.max_rate), **kw)


def _looks_like_export(path: Path) -> bool:
    from .output_guard import looks_like_export

    return looks_like_export(path)


def _check_target(path: Path, force: bool, what: str, looks_ok: Callable[[Path], bool]) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise ExtractError(f"{what} {path} exists; pass --force to overwrite it")
    if not looks_ok(path):
        raise ExtractError(f"{what} {path} exists and does not look like an earlier output "
                           f"(refusing to delete it, even with --force)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _resolve_model_path(spec: str | None) -> Path:
    """As the node resolves model.path (see qvl_ros.model.checkpoint.resolve_checkpoint). A plain
    directory is taken as it is, without importing the model package: a Ray driver, which never runs
    the model, then starts without torch (about a second)."""
    name = str(spec or "").strip()
    if name and not name.startswith("tiny") and Path(name).expanduser().is_dir():  # "tiny*": the bundled models
        return Path(name).expanduser()
    from ..model.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(spec)
    except FileNotFoundError as exc:
        raise ExtractError(f"cannot load model: {exc}") from None


def _load_model(cfg: ExtractConfig, path: Path):
    from ..model import BatchedQwenVL

    try:
        return BatchedQwenVL.from_pretrained(path, device=cfg.device, dtype=cfg.dtype,
                                             min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except Exception as exc:  # anything from config parsing to weight shapes or a missing device
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractError(f"cannot load model {path}: {reason}") from None


def _host_storage(tensor):
    """(dtype name, shape, uint8 numpy bytes) of a host tensor, C order little-endian."""
    from ..ros.tensor_msg import storage_array

    arr, dtype = storage_array(tensor, None)
    return dtype, arr.shape, arr.reshape(-1).view("u1")


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def _fmt_stamp(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


# ------------------------------------------------------------------------------------ progress
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
        return (f"{head}{done} | sets {sets} | {rate:.1f} sets/s | elapsed {_fmt_duration(elapsed)} "
                f"| ETA {_fmt_duration(eta)}")

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


# ------------------------------------------------------------------------------- set source
class _SetSource:
    """Reads, converts and synchronizes the camera frames; iterating yields SyncSets in order."""

    def __init__(self, bags, cfg: ExtractConfig, device, start_ns=None, stop_ns=None,
                 stopped: Callable[[], bool] = lambda: False, window: "_Window | None" = None) -> None:
        self.bags = bags
        self.cfg = cfg
        self.device = device
        self.start_ns, self.stop_ns = start_ns, stop_ns
        self.stopped = stopped
        self.window = dataclasses.replace(window) if window is not None else _Window()
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
                self.warmup_sets.append(_signature(birth, s.synced, s.ready))
                continue
            if self.window.tail_keep:
                self.tail_sets.append(_signature(birth, s.synced, s.ready))
            if s.admitted:
                yield birth, s.ready


FLUSH_BIRTH = (1 << 63) - 1  # birth of the sets flushed after the last frame


@dataclass
class _Window:
    """Which of the synchronized sets a run owns: those born (completed by a frame recorded) at
    or after ``own_from_ns``; earlier ones are synchronization warm-up, recorded as signatures
    only. ``flush_at_end``: the read range ends where the recordings (or --end) end, so the sets
    the synchronizer still holds are flushed there, as one pass over everything would."""

    own_from_ns: int = -(1 << 63)
    tail_keep: int = 0  # signatures are kept of this many of the last owned sets
    warmup_keep: int | None = None  # and of this many of the last warm-up sets (None: all)
    flush_at_end: bool = True
    owning: bool = False


def _signature(birth: int, s, clip_set) -> list:
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


class _ReadAhead:
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


class _StopOnSignal:
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
@dataclass
class _Plan:
    """A run's options after every check that needs neither the model nor an output file."""

    cfg: ExtractConfig
    names: list[str]
    kinds: list[str]
    output: Path
    export: Path | None
    start_ns: int | None
    stop_ns: int | None
    window: _Window = field(default_factory=_Window)  # the sets this run owns (all, unless a shard)
    input_names: list[str] | None = None  # the inputs as the metadata names them (default: as opened)


def custom_data(inputs: Sequence[str], topics: Sequence[str], names: Sequence[str], model_name: str,
                cfg: ExtractConfig) -> dict[str, str]:
    """The output bag's metadata (rosbag2 custom_data): what it was extracted from, and how."""
    return {
        "qvl_ros.inputs": " ".join(inputs),
        "qvl_ros.topics": " ".join(topics),
        "qvl_ros.camera_names": " ".join(names),
        "qvl_ros.model": model_name,
        "qvl_ros.prompt": cfg.prompt,
        "qvl_ros.slop_ns": str(resolve_slop_ns(cfg.slop, cfg.expected_rates)),
        "qvl_ros.stamps": cfg.stamps,
    }


def _check_number(value, what: str, *, minimum: float = 0.0, strict: bool = False, maximum: float = 1e9,
                  integer: bool = False) -> None:
    """A finite number within [minimum, maximum] (or (minimum, maximum] with ``strict``)."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum) and value <= maximum
    ok = ok and (not integer or float(value).is_integer())
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ExtractError(f"--{what} must be a finite {'integer' if integer else 'number'} {bound} "
                           f"and at most {maximum:g}, got {value!r}")


# ExtractConfig field -> the node parameter of the same meaning (its range is the option's)
PARAM_OF = {"slop": "sync.slop", "queue_size": "sync.queue_size", "policy": "sync.policy",
            "reorder": "sync.reorder_tolerance", "reset_threshold": "sync.reset_threshold",
            "clip_frames": "video.frames", "clip_stride": "video.stride", "batch": "batch.max_size",
            "max_rate": "max_rate", "dtype": "model.dtype", "min_pixels": "model.min_pixels",
            "max_pixels": "model.max_pixels", "prompt": "prompt", "features": "features", "frame_id": "frame_id",
            "caption": "caption.enabled", "max_new_tokens": "caption.max_new_tokens",
            "max_input_pixels": "max_input_pixels", "expected_rates": "diagnostics.expected_rates"}


# and the node parameters a parameter file gives besides those
_FROM_FILE = {**PARAM_OF, "model": "model.path", "device": "model.device", "stamps": "sync.stamp_source"}


def _check_param_option(value, field_name: str) -> None:
    """An option with a node parameter: that parameter's rule, in the option's words."""
    param = P[PARAM_OF[field_name]]
    what = field_name.replace("_", "-")
    if value is None:
        return
    if param.type in ("integer", "double") and value not in param.special:
        _check_number(value, what, minimum=param.low, strict=param.low_open, maximum=param.high,
                      integer=param.type == "integer")
    try:
        param.check(list(value) if param.type in ("strings", "doubles") else value)
    except ParamError as exc:
        raise ExtractError(f"--{what}: {exc}") from None


def _check_options(cfg: ExtractConfig) -> None:
    """Every numeric and choice option, so that nothing overflows or fails after the model loaded."""
    for field_name in PARAM_OF:
        _check_param_option(getattr(cfg, field_name), field_name)
    checks = [
        (cfg.shard_mb, "shard-mb", dict(strict=True, maximum=1 << 20)),
        (cfg.batch_window, "batch-window", dict(maximum=1e6)),
        (cfg.prefetch, "prefetch", dict(integer=True, maximum=1024)),
    ]
    for value, what, kw in checks:
        _check_number(value, what, **kw)
    if cfg.stamps not in ("header", "bag", "arrival", "auto"):
        raise ExtractError("--stamps must be header, bag (= arrival: the recording time) or auto")


def _plan(cfg: ExtractConfig, bags) -> _Plan:
    """Check options, names, output and time range against the opened recordings."""
    from ..ros.feature_msgs import check_kinds
    from .bag_io import camera_names_for

    try:
        kinds = check_kinds(list(cfg.features))
    except ValueError as exc:
        raise ExtractError(str(exc)) from None
    topics = list(cfg.topics)
    names = list(cfg.camera_names) if cfg.camera_names else camera_names_for(topics)
    if len(names) != len(topics) or len(set(names)) != len(names) or not all(names):
        raise ExtractError(f"--names needs one unique, non-empty name per topic; got {names} for {topics}")
    start_ns = _parse_time(cfg.start, bags.start_ns, "start")
    stop_ns = _parse_time(cfg.end, bags.start_ns, "end")
    if start_ns is not None and stop_ns is not None and stop_ns <= start_ns:
        raise ExtractError("--end must be after --start")
    if not cfg.allow_empty:
        empty = [c.topic for c in bags.cameras if c.count == 0]
        if empty:
            raise ExtractError(f"topic{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                               f"{'have' if len(empty) > 1 else 'has'} no messages in the recordings, so no set "
                               f"can be formed (pass --allow-empty to write an empty output anyway)")
        if start_ns is not None and start_ns >= bags.end_ns:
            raise ExtractError(f"--start {cfg.start} is at or after the end of the recordings "
                               f"({_fmt_stamp(bags.end_ns)}; pass --allow-empty to write an empty output anyway)")
        if stop_ns is not None and stop_ns <= bags.start_ns:
            raise ExtractError(f"--end {cfg.end} is at or before the start of the recordings "
                               f"({_fmt_stamp(bags.start_ns)}; pass --allow-empty to write an empty output anyway)")
    return _Plan(cfg, names, kinds, Path(cfg.output), Path(cfg.export) if cfg.export is not None else None,
                 start_ns, stop_ns)


def _check_outputs(cfg: ExtractConfig, inputs: list[Path]) -> None:
    from .output_guard import check_writable, looks_like_output

    output = Path(cfg.output)
    export = Path(cfg.export) if cfg.export is not None else None
    for target in [output] + ([export] if export else []):
        if any(target.resolve() == p.resolve() for p in inputs):
            raise ExtractError(f"{target} is also an input")
    if export is not None and export.resolve() == output.resolve():
        raise ExtractError("--export must differ from --out")
    _check_target(output, cfg.force, "output", looks_like_output)
    if export is not None:
        _check_target(export, cfg.force, "export directory", _looks_like_export)
    for target, what in ((output, "--out"), (export, "--export")):
        if target is None:
            continue
        try:
            check_writable(target)
        except OSError as exc:
            raise ExtractError(f"{what} {target} cannot be created: {exc.strerror or exc}") from None


def extract(cfg: ExtractConfig, on_progress: Callable[[ExtractReport], None] | None = None,
            stop: threading.Event | None = None, stream=None, progress: str = "auto",
            progress_interval: float | None = None, model=None) -> ExtractReport:
    """Run one extraction (see the module doc). Raises :class:`ExtractError` before starting
    when an option, input, topic, model or the output is unusable (all checked before the model
    loads); otherwise returns a report, also when the run was interrupted
    (``report.interrupted``) or failed (``report.error``).

    ``on_progress`` is called with the report after every written batch; ``stop`` ends the run
    after the batch in flight when set (as SIGINT does). ``model``: an already loaded
    ``BatchedQwenVL`` to use instead of loading ``cfg.model`` (several runs, one load).
    """
    from .bag_io import BagInputError, CameraBags, qvl_typestore

    _check_options(cfg)
    inputs = [Path(p) for p in cfg.inputs]
    _check_outputs(cfg, inputs)
    try:
        qvl_typestore()  # the output's message definitions, read from msg/*.msg
    except FileNotFoundError as exc:
        raise ExtractError(str(exc)) from None
    try:
        bags = CameraBags(inputs, list(cfg.topics))
    except BagInputError as exc:
        raise ExtractError(str(exc)) from None
    try:
        plan = _plan(cfg, bags)
        if model is None:
            model_path = _resolve_model_path(cfg.model)
            model = _load_interruptibly(cfg, model_path, (stream or sys.stderr) if cfg.announce_model_load else None)
        run = _Extraction(plan, bags, model, stop if stop is not None else threading.Event(),
                          stream if stream is not None else sys.stderr, on_progress)
        return run.run(progress, progress_interval)
    finally:
        bags.close()


def _load_interruptibly(cfg: ExtractConfig, path: Path, announce=None):
    """Load the model; Ctrl-C during the load ends it with KeyboardInterrupt, also where the process
    started with SIGINT ignored (a background job) or a library swallowed the exception raised
    inside its code. ``announce``: a stream that gets "loading model ..." once Ctrl-C is handled."""
    if threading.current_thread() is not threading.main_thread():
        return _load_model(cfg, path)
    seen: list[int] = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if announce is not None:
            announce.write(f"loading model {path} ...\n")
            announce.flush()
        model = _load_model(cfg, path)
    finally:
        signal.signal(signal.SIGINT, previous)
    if seen:
        raise KeyboardInterrupt
    return model


class _Extraction:
    """One run: opens the outputs, reads/computes/writes batches, closes everything."""

    def __init__(self, plan: _Plan, bags, model, stop: threading.Event, stream, on_progress) -> None:
        from ..ros.feature_msgs import placeholder_token_ids

        cfg = plan.cfg
        self.plan, self.cfg, self.bags, self.model = plan, cfg, bags, model
        self.stop, self.stream, self.on_progress = stop, stream, on_progress
        cameras = [CameraReport(c.topic, name, c.short_type) for c, name in zip(bags.cameras, plan.names)]
        self.report = ExtractReport(output=plan.output, export=plan.export, cameras=cameras, model=model.name,
                                    device=str(model.device))
        self.halt = threading.Event()  # set by a signal, and when the run ends for any reason
        self.source = _SetSource(bags, cfg, model.device, plan.start_ns, plan.stop_ns, self.stopped, plan.window)
        self._window_ns = int(round(cfg.batch_window * 1e9))
        self.writer = self.exporter = self.guard = None
        self._request = ModelRequest(cfg.prompt, features=True, texts=cfg.caption,
                                     max_new_tokens=cfg.max_new_tokens)
        self._geometry: dict = {}  # (height, width, frames) -> the model's input geometry
        self._placeholder_ids = placeholder_token_ids(model)  # to index the hidden rows

    def stopped(self) -> bool:
        return self.halt.is_set() or self.stop.is_set()

    # ------------------------------------------------------------------------------ outputs
    def _custom_data(self) -> dict[str, str]:
        inputs = self.plan.input_names or [str(p) for p in self.bags.paths]
        return custom_data(inputs, [c.topic for c in self.bags.cameras], self.plan.names, self.model.name, self.cfg)

    def _open_outputs(self) -> None:
        from .bag_io import FeatureBagWriter
        from .export import FeatureExporter
        from .output_guard import OutputGuard

        plan, cfg = self.plan, self.cfg
        if cfg.force:
            _remove(plan.output)
            if plan.export is not None:
                _remove(plan.export)
        self.writer = FeatureBagWriter(plan.output, captions=cfg.caption, custom_data=self._custom_data())
        self.guard = OutputGuard(plan.output)
        self.guard.start()
        if plan.export is not None:
            self.exporter = FeatureExporter(plan.export, plan.names, [c.topic for c in self.bags.cameras],
                                            self.model.name, cfg.prompt, plan.kinds, cfg.caption,
                                            shard_bytes=int(cfg.shard_mb * (1 << 20)))

    def _close_outputs(self) -> None:
        """Close the bag and the export; never raises (a failure is the report's error, and the
        output keeps its incomplete marker)."""
        report = self.report
        closed = True
        if self.guard is not None:
            self.guard.release()  # its space is what closing needs on a full disk
        for name, closer in (("output", self.writer), ("export", self.exporter)):
            if closer is None:
                continue
            try:
                closer.close()
            except Exception as exc:
                closed = closed and name != "output"
                report.error = report.error or f"closing the {name} failed: {type(exc).__name__}: {exc}"
        if self.guard is not None and closed:
            self.guard.finish()
        report.output_complete = closed and self.writer is not None

    # ------------------------------------------------------------------------------ batches
    def _compute(self, batch):
        feats, texts = call_model(self.model, batch, self._request)  # clip rates from the clip stamps
        return batch, feats, texts

    def _emit(self, batch, feats, texts) -> None:
        """Write one computed batch (after making sure the disk can take it and still close)."""
        from ..ros.feature_msgs import hidden_rows_of, sample_tensors, set_info

        cfg, names, writer, report = self.cfg, self.plan.names, self.writer, self.report
        kinds, model = self.plan.kinds, self.model
        rows = []
        for b in range(len(batch)):
            tensors = sample_tensors(feats, b, names, kinds)  # waits for the device
            rows.append((tensors, [(name, *_host_storage(t)) for name, t in tensors]))
        sizes = [sum(int(d.nbytes) for *_, d in storage) + 4096 for _, storage in rows]
        self.guard.before_write(sum(sizes), max(sizes))
        for b, (s, (tensors, storage)) in enumerate(zip(batch, rows)):
            msgs = [writer.feature_tensor(name, dtype, shape, data) for name, dtype, shape, data in storage]
            info = set_info(s, names, model, model.name, cfg.prompt, cfg.frame_id, self._geometry)
            writer.write_features(info, msgs, hidden_rows_of(feats, b, self._placeholder_ids, names, kinds))
            if texts is not None:
                writer.write_caption(info, texts[b])
                report.captions_written += 1
            if self.exporter is not None:
                self.exporter.add(s.stamps, tensors, texts[b] if texts is not None else None)
            report.sets_written += 1
        self.progress.update(self.source.frames_read, report.sets_written)
        if self.on_progress is not None:
            self.on_progress(report)

    def _pipeline(self, sets) -> None:
        """Software pipeline in one thread: batch i+1 is read and decoded, and batch i written,
        while a GPU still computes batch i+1 (on a CPU the order changes nothing). A batch ends
        when it holds --batch sets or the next set is born in another batch window."""
        batch: list = []
        window = None
        for birth, s in sets:
            w = batch_window_index(birth, self._window_ns)
            if batch and w != window:
                self._submit(batch)
                batch = []
                if self.stopped():
                    return
            window = w
            batch.append(s)
            if len(batch) == self.cfg.batch:
                self._submit(batch)
                batch = []
                if self.stopped():
                    return
        if batch and not self.stopped():
            self._submit(batch)
        self._emit_pending()

    def _submit(self, batch) -> None:
        """Compute a batch, then write the one computed before it."""
        result = self._compute(batch)
        self._emit_pending()
        self.pending = result

    def _emit_pending(self) -> None:
        if self.pending is not None:
            done, self.pending = self.pending, None
            self._emit(*done)

    def _reader(self):
        cfg, device = self.cfg, self.model.device
        depth = (0 if device.type == "cpu" else 2) if cfg.prefetch is None else cfg.prefetch
        if depth <= 0:
            return None
        threads = cfg.reader_threads if device.type == "cpu" and cfg.reader_threads else None
        return _ReadAhead(self.source, depth * cfg.batch, torch_threads=threads)

    # ------------------------------------------------------------------------------ the run
    def run(self, progress: str, progress_interval: float | None) -> ExtractReport:
        from .output_guard import DiskFull

        report, source = self.report, self.source
        self.progress = Progress(self.bags.estimated_frames(self.plan.start_ns, self.plan.stop_ns), progress,
                                 progress_interval, self.stream)
        self.pending = None  # (batch, features, texts): computed, not yet written
        reader = None
        at_once = False  # a second Ctrl-C: close the files without writing more
        t0 = time.perf_counter()
        with _StopOnSignal(self.halt, self.cfg.handle_signals, self.stream) as signals:
            try:
                self._open_outputs()
                reader = self._reader()
                self._pipeline(reader if reader is not None else source)
            except KeyboardInterrupt:
                at_once = True
                report.error = "stopped at once by Ctrl-C"
                if signals.signum is None:
                    signals.signum = signal.SIGINT
            except DiskFull as exc:
                report.error = f"disk full: {exc.strerror}; the sets written so far are kept"
                self.pending = None
            except Exception as exc:  # a read, model or write failure mid-run: keep what is written
                report.error = f"{type(exc).__name__}: {exc}"
            finally:
                signals.closing = True  # from here on, signals no longer interrupt: close the files
                self.halt.set()
                if reader is not None:
                    reader.close()
                if self.pending is not None and not at_once and self.writer is not None:
                    try:  # a batch computed before the failure is still written
                        self._emit_pending()
                    except Exception as exc:
                        report.error = report.error or f"{type(exc).__name__}: {exc}"
                self._close_outputs()
            report.interrupted = signals.signum
        report.elapsed_s = time.perf_counter() - t0
        self.progress.finish(source.frames_read, report.sets_written)
        _fill_camera_stats(report, source)
        report.damaged = list(self.bags.damaged)
        return report


def _fill_camera_stats(report: ExtractReport, source: _SetSource) -> None:
    stats = source.sync.stats()
    # Sets the synchronizer emitted that were never written: the run stopped first.
    if source.clips is not None:  # sets before a camera had a full clip are not written
        clip_stats = source.clips.stats()
        report.clips_incomplete = clip_stats["incomplete"]
        report.clip_restarts = {cam.name: {r: v for r, v in rs.items() if v}
                                for cam, rs in zip(report.cameras, clip_stats["restarts"])}
    report.sets_unwritten = stats["sets"] - report.clips_incomplete - report.sets_written
    for k, cam in enumerate(report.cameras):
        cam.frames = source.frames[k]
        cam.failed = source.failed[k]
        cam.invalid = {r: v for r, v in sorted(source.intake.invalid[k].items()) if v}
        cam.dropped = {r: v for r, v in stats["dropped"][k].items() if v}
        cam.pending = stats["pending"][k]
        cam.used = stats["used"][k] - report.sets_unwritten - report.clips_incomplete
        cam.in_unwritten_sets = report.sets_unwritten
    report.failures = list(source.failures)
    report.reached_end = source.finished


_DROP_TEXT = {
    "unmatched": "no frame of every other camera within the slop",
    "too_old": "stamp not newer than the frame this camera last contributed",
    "queue_full": "waited longer than --queue-size frames for a match",
    "time_reset": "time jumped back (recordings restart or overlap)",
}


def format_summary(report: ExtractReport, max_failures: int = 10) -> str:
    """The human-readable end-of-run summary."""
    lines = []
    state = "done"
    if report.interrupted is not None:
        state = f"interrupted by {signal.Signals(report.interrupted).name}"
    elif report.error:
        state = "stopped by an error"
    written = f"{report.sets_written} set{'s' if report.sets_written != 1 else ''} written"
    if report.captions_written:
        written += f" (+{report.captions_written} captions)"
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
            lines.append(f"  {reason}: {_DROP_TEXT[reason]}")
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
            lines.append(f"  {topic} at {_fmt_stamp(stamp)}: {reason}")
        if len(report.failures) > max_failures:
            lines.append(f"  ... and {len(report.failures) - max_failures} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
# (option, ExtractConfig field, argparse keywords): options whose default and rule are a node
# parameter's (PARAM_OF) or that a parameter file can give (topics, names, model, device)
_TABLE_OPTIONS = [
    (("-t", "--topics"), "topics", dict(nargs="+", metavar="TOPIC", help="camera topics (sensor_msgs/Image or "
                                "CompressedImage), in camera order; required unless --params-file names them")),
    ("--names", "camera_names", dict(nargs="+", metavar="NAME",
                                     help="camera names, one per topic (default: from the topic names)")),
    ("--model", "model", dict(help="checkpoint directory, Hugging Face id in the local cache, or tiny / "
                              "tiny-qwen2-vl (default: the bundled tiny Qwen2.5-VL; node parameter model.path)")),
    ("--device", "device", dict(help="auto (cuda if available), cpu, cuda, cuda:1, ... (node parameter model.device)")),
    ("--dtype", "dtype", dict(choices=["auto", "float32", "bfloat16", "float16"])),
    ("--min-pixels", "min_pixels", dict(type=int)),
    ("--max-pixels", "max_pixels", dict(type=int)),
    ("--slop", "slop", dict(type=float)),
    ("--policy", "policy", dict(choices=["approximate_time", "max_sets"])),
    ("--queue-size", "queue_size", dict(type=int)),
    ("--reorder", "reorder", dict(type=float)),
    ("--reset-threshold", "reset_threshold", dict(type=float)),
    ("--stamps", "stamps", dict(choices=["header", "bag", "arrival", "auto"], help="synchronize on header stamps "
                                "(default), recording times (bag = arrival), or auto (recording time where a "
                                "header stamp is zero); node parameter sync.stamp_source")),
    ("--max-rate", "max_rate", dict(type=float)),
    ("--batch", "batch", dict(type=int)),
    ("--prompt", "prompt", dict()),
    ("--features", "features", dict(nargs="+", choices=["vision", "hidden"])),
    ("--caption", "caption", dict(action="store_true", help="also generate a caption per set (/qvl/caption)")),
    ("--max-new-tokens", "max_new_tokens", dict(type=int)),
    ("--frame-id", "frame_id", dict()),
    ("--clip-frames", "clip_frames", dict(type=int, metavar="K")),
    ("--clip-stride", "clip_stride", dict(type=int, metavar="S")),
    ("--max-input-pixels", "max_input_pixels", dict(type=int, metavar="N")),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qvl-ros extract` (shared by `python -m qvl_ros.offline.extract`)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="rosbag2 recording (directory, or .mcap/.db3 file); several are merged in time order")
    parser.add_argument("-o", "--out", required=True, metavar="OUTPUT",
                        help="output rosbag2 directory (mcap) with /qvl/features (and /qvl/caption)")
    parser.add_argument("--params-file", default=None, metavar="YAML",
                        help="the node's parameter file (config/multi_cam.yaml): its values for the options below "
                             "(and camera_topics for --topics); an option given here wins")
    for option, field_name, kw in _TABLE_OPTIONS:
        param = P[PARAM_OF[field_name]] if field_name in PARAM_OF else None
        text = kw.pop("help", None) or (param.description if param is not None else "")
        default = param.default if param is not None else None
        shown = f" (default {default!r}; node parameter {param.name})" if param is not None else ""
        flags = option if isinstance(option, tuple) else (option,)
        parser.add_argument(*flags, dest=field_name, default=None, help=text + shown, **kw)
    parser.add_argument("--start", default=None, metavar="SEC",
                        help="first recording time to read: bag time in seconds, or +SEC after the bag start")
    parser.add_argument("--end", default=None, metavar="SEC",
                        help="recording time to stop at (exclusive): bag time in seconds, or +SEC after the start")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also write the features as safetensors shards + index.json to DIR")
    parser.add_argument("--shard-mb", type=float, default=512.0, help="approximate export shard size in MB")
    parser.add_argument("--batch-window", type=float, default=10.0, metavar="SEC",
                        help="a batch never mixes sets completed in different SEC-second windows of recording "
                             "time (default 10; sharded runs cut on this grid, so they batch as one process "
                             "does; 0: no windows)")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="batches read and decoded ahead in a thread (default: 0 on a CPU, 2 on a GPU)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="exit 0 even when no set is produced (empty topic, --start past the end, no match)")
    parser.add_argument("-f", "--force", action="store_true",
                        help="overwrite OUTPUT (and the export DIR): an earlier output, finished or incomplete")
    parser.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                        help="progress display on stderr (auto: a bar on a terminal, else a line every 10 s)")
    parser.add_argument("--progress-interval", type=float, default=None, help="seconds between progress updates")
    from .fleet import add_arguments as add_fleet_arguments

    add_fleet_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """The run's configuration: each option as given, else the parameter file's value of its
    node parameter (--params-file), else the table's default (the node's)."""
    try:
        node = read_params_file(args.params_file) if args.params_file else {}
    except (OSError, ParamError) as exc:
        raise ExtractError(f"--params-file: {exc}") from None
    values = {}
    for _, field_name, _ in _TABLE_OPTIONS:
        given = getattr(args, field_name)
        name = _FROM_FILE.get(field_name)
        if given is None and name is not None and name in node:
            given = node[name]
        values[field_name] = given
    if "diagnostics.expected_rates" in node:
        values["expected_rates"] = list(node["diagnostics.expected_rates"])
    if values["topics"] is None and "camera_topics" in node:  # the node's names, resolved in the root namespace
        values["topics"] = [t if t.startswith("/") else "/" + t for t in node["camera_topics"]]
    if values["camera_names"] is None and node.get("camera_names"):
        values["camera_names"] = node["camera_names"]
    if not values["topics"]:
        raise ExtractError("--topics (or camera_topics in --params-file) is required")
    for field_name in ("min_pixels", "max_pixels"):
        values[field_name] = values[field_name] or None  # 0: the checkpoint's
    if values["model"] == "":
        values["model"] = None
    cfg = {k: v for k, v in values.items() if v is not None}
    return ExtractConfig(
        inputs=args.inputs, output=args.out, start=args.start, end=args.end, force=args.force,
        export=args.export, shard_mb=args.shard_mb, prefetch=args.prefetch, allow_empty=args.allow_empty,
        announce_model_load=args.progress != "none", batch_window=args.batch_window, **cfg)


def run_cli(args: argparse.Namespace, prog: str = "qvl-ros extract") -> int:
    """Run from parsed arguments; print progress and the summary on stderr; return the exit code."""
    fleet = None
    try:
        _check_number(args.progress_interval, "progress-interval", maximum=1e6)
        from .fleet import options_from_args, run_sharded

        fleet = options_from_args(args)
        if fleet is None or fleet.ray is None:  # this process runs the model (a Ray driver does not: no torch)
            from ..model.kernels import tune_cpu_allocator

            tune_cpu_allocator()  # a command-line process of its own: set before the model allocates
        if fleet is not None:
            return run_sharded(config_from_args(args), fleet, progress=args.progress,
                               progress_interval=args.progress_interval)
        report = extract(config_from_args(args), progress=args.progress, progress_interval=args.progress_interval)
    except ExtractError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the run started (model loading; joining a cluster)
        sys.stderr.write(f"\n{prog}: interrupted before extraction started; " + (
            "nothing was written\n" if fleet is None else "no shard started; rerun the same command to go on\n"))
        return EXIT_SIGNAL[signal.SIGINT]
    sys.stderr.write(format_summary(report) + "\n")
    sys.stderr.flush()
    if report.interrupted is not None:
        return EXIT_SIGNAL.get(report.interrupted, EXIT_FAILED)
    if report.error:
        return EXIT_FAILED
    if report.sets_written == 0 and not args.allow_empty:
        sys.stderr.write(f"{prog}: no set was produced (pass --allow-empty if that is expected)\n")
        return EXIT_EMPTY
    return EXIT_OK


def build_parser(prog: str = "python -m qvl_ros.offline.extract") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Extract Qwen-VL features from camera topics of rosbag2 recordings.")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(args, prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
