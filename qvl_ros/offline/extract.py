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
second Ctrl-C stops at once but still closes the files.

Exit status: 0 done; 1 an error during the run (OUTPUT is closed and holds what was written);
2 a problem found before starting (missing input, topic not in the recordings, topic of another
type, unreadable recording, model that cannot be loaded, OUTPUT exists without --force, bad
arguments); 130 / 143 interrupted by SIGINT / SIGTERM (OUTPUT is complete up to that point).

The same run as a function: :func:`extract` with an :class:`ExtractConfig`, returning an
:class:`ExtractReport`.
"""
from __future__ import annotations

import argparse
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

__all__ = ["ExtractConfig", "ExtractReport", "ExtractError", "extract", "add_arguments", "run_cli", "main"]

DEFAULT_PROMPT = "Describe the scene."
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
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
    slop: float = 0.02  # seconds
    batch: int = 4
    prompt: str = DEFAULT_PROMPT
    features: Sequence[str] = ("vision", "hidden")
    caption: bool = False
    max_new_tokens: int = 32
    start: str | float | None = None  # bag time in seconds, or "+S" = S seconds after the start
    end: str | float | None = None
    stamps: str = "header"  # "header": camera header stamps; "bag": recording times
    queue_size: int = 64  # frames kept per camera while waiting for a match
    reorder: float = 0.2  # seconds of out-of-order stamps tolerated per camera
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


@dataclass
class CameraReport:
    topic: str
    name: str
    msgtype: str
    frames: int = 0  # read from the recordings
    used: int = 0  # part of a written set
    failed: int = 0  # could not be deserialized or converted
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


def _looks_like_bag(path: Path) -> bool:
    """Whether `path` is a rosbag2 directory we may delete for --force."""
    if not path.is_dir():
        return False
    allowed = (".mcap", ".db3", ".zstd", ".yaml", ".db3-shm", ".db3-wal")
    entries = list(path.iterdir())
    return any(e.name == "metadata.yaml" for e in entries) and all(
        e.is_file() and e.name.endswith(allowed) for e in entries)


def _looks_like_export(path: Path) -> bool:
    from .export import INDEX_NAME

    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return any(e.name == INDEX_NAME for e in entries) and all(
        e.is_file() and (e.name.endswith((".safetensors", ".json", ".tmp"))) for e in entries)


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
    """As the node resolves model.path (see qvl_ros.model.checkpoint.resolve_checkpoint)."""
    from ..model.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(spec)
    except FileNotFoundError as exc:
        raise ExtractError(f"cannot load model: {exc}") from None


def _load_model(cfg: ExtractConfig):
    from ..model import BatchedQwenVL

    path = _resolve_model_path(cfg.model)
    try:
        return BatchedQwenVL.from_pretrained(path, device=cfg.device, dtype=cfg.dtype,
                                             min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except Exception as exc:  # anything from config parsing to weight shapes or a missing device
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractError(f"cannot load model {path}: {reason}") from None


def _host_storage(tensor):
    """(dtype name, shape, uint8 numpy bytes) of a host tensor, C order little-endian."""
    from ..ros.tensor_msg import _storage_array

    arr, dtype = _storage_array(tensor, None)
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

    def line(self, frames: int, sets: int) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = sets / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, frames / self.total)
            eta = elapsed * (1 - frac) / frac if frac > 0 else math.inf
            done = f"frames {frames}/{self.total} ({100 * frac:3.0f}%)"
        else:
            eta, done = math.inf, f"frames {frames}"
        return (f"{done} | sets {sets} | {rate:.1f} sets/s | elapsed {_fmt_duration(elapsed)} "
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
                 stopped: Callable[[], bool] = lambda: False) -> None:
        from ..core.synchronizer import Synchronizer

        self.bags = bags
        self.cfg = cfg
        self.device = device
        self.start_ns, self.stop_ns = start_ns, stop_ns
        self.stopped = stopped
        n = len(bags.cameras)
        slop_ns = int(round(cfg.slop * 1e9))
        reorder_ns = int(round(cfg.reorder * 1e9))
        reset_ns = max(1_000_000_000, reorder_ns)
        self.sync = Synchronizer(n, slop_ns, cfg.queue_size, reset_threshold=reset_ns,
                                 reorder_tolerance=reorder_ns)
        self.clips = None
        if cfg.clip_frames:  # the node's clip rule (qvl_ros.core.clips)
            from ..core.clips import ClipAssembler

            self.clips = ClipAssembler(n, cfg.clip_frames, cfg.clip_stride, lag=cfg.queue_size)
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
        from ..core.conversion import ConversionError, msg_to_tensor
        from ..core.stamps import stamp_ns as header_ns

        use_header = self.cfg.stamps == "header"
        sync, bags, device = self.sync, self.bags, self.device
        for k, rec_ns, raw in bags.records(self.start_ns, self.stop_ns):
            if self.stopped():
                return
            self.frames[k] += 1
            try:
                msg = bags.deserialize(k, raw)
            except ValueError as exc:
                self._fail(k, rec_ns, str(exc))
                continue
            stamp = header_ns(msg.header.stamp) if use_header else rec_ns
            try:
                image = msg_to_tensor(msg, device, min_size=(28, 28))
            except ConversionError as exc:
                self._fail(k, stamp, str(exc))
                continue
            if self.clips is not None:
                self.clips.push(k, stamp, image)
            yield from self._sets(sync.add(k, stamp, image))
        self.finished = True
        yield from self._sets(sync.flush())

    def _sets(self, sync_sets) -> Iterator:
        if self.clips is None:
            yield from sync_sets
            return
        for s in sync_sets:
            c = self.clips.assemble(s)
            if c is not None:
                yield c


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
def extract(cfg: ExtractConfig, on_progress: Callable[[ExtractReport], None] | None = None,
            stop: threading.Event | None = None, stream=None, progress: str = "auto",
            progress_interval: float | None = None, model=None) -> ExtractReport:
    """Run one extraction (see the module doc). Raises :class:`ExtractError` before starting
    when an input, topic, model or the output is unusable; otherwise returns a report, also
    when the run was interrupted (``report.interrupted``) or failed (``report.error``).

    ``on_progress`` is called with the report after every written batch; ``stop`` ends the run
    after the batch in flight when set (as SIGINT does). ``model``: an already loaded
    ``BatchedQwenVL`` to use instead of loading ``cfg.model`` (several runs, one load).
    """
    from .bag_io import BagInputError, CameraBags, FeatureBagWriter, camera_names_for, qvl_typestore
    from ..ros.feature_msgs import check_kinds, sample_tensors

    stream = stream if stream is not None else sys.stderr
    stop = stop if stop is not None else threading.Event()
    try:
        kinds = check_kinds(list(cfg.features))
    except ValueError as exc:
        raise ExtractError(str(exc)) from None
    if cfg.batch < 1:
        raise ExtractError("--batch must be at least 1")
    if not cfg.slop >= 0:
        raise ExtractError("--slop must be >= 0 seconds")
    if cfg.reorder < 0 or cfg.queue_size < 1:
        raise ExtractError("--reorder must be >= 0 and --queue-size at least 1")
    if cfg.caption and cfg.max_new_tokens < 1:
        raise ExtractError("--max-new-tokens must be at least 1")
    if cfg.stamps not in ("header", "bag"):
        raise ExtractError("--stamps must be 'header' or 'bag'")
    if cfg.clip_frames < 0 or cfg.clip_frames == 1 or cfg.clip_stride < 1:
        raise ExtractError("--clip-frames must be 0 (still images) or at least 2, --clip-stride at least 1")
    topics = list(cfg.topics)
    names = list(cfg.camera_names) if cfg.camera_names else camera_names_for(topics)
    if len(names) != len(topics) or len(set(names)) != len(names) or not all(names):
        raise ExtractError(f"--names needs one unique, non-empty name per topic; got {names} for {topics}")

    output = Path(cfg.output)
    export = Path(cfg.export) if cfg.export is not None else None
    inputs = [Path(p) for p in cfg.inputs]
    for target in [output] + ([export] if export else []):
        if any(target.resolve() == p.resolve() for p in inputs):
            raise ExtractError(f"{target} is also an input")
    if export is not None and export.resolve() == output.resolve():
        raise ExtractError("--export must differ from --out")
    _check_target(output, cfg.force, "output", _looks_like_bag)
    if export is not None:
        _check_target(export, cfg.force, "export directory", _looks_like_export)

    try:
        qvl_typestore()  # the output's message definitions, read from msg/*.msg
    except FileNotFoundError as exc:
        raise ExtractError(str(exc)) from None
    try:
        bags = CameraBags(inputs, topics)
    except BagInputError as exc:
        raise ExtractError(str(exc)) from None
    try:
        start_ns = _parse_time(cfg.start, bags.start_ns, "start")
        stop_ns = _parse_time(cfg.end, bags.start_ns, "end")
        if start_ns is not None and stop_ns is not None and stop_ns <= start_ns:
            raise ExtractError("--end must be after --start")
        if model is None:
            model = _load_model(cfg)
        return _run(cfg, bags, model, names, kinds, output, export, start_ns, stop_ns, stop, stream,
                    progress, progress_interval, on_progress, FeatureBagWriter, sample_tensors)
    finally:
        bags.close()


def _run(cfg, bags, model, names, kinds, output, export, start_ns, stop_ns, stop, stream, progress,
         progress_interval, on_progress, FeatureBagWriter, sample_tensors) -> ExtractReport:
    from .export import FeatureExporter

    cameras = [CameraReport(c.topic, name, c.short_type) for c, name in zip(bags.cameras, names)]
    report = ExtractReport(output=output, export=export, cameras=cameras, model=model.name,
                           device=str(model.device))
    if cfg.force:
        _remove(output)
        if export is not None:
            _remove(export)
    custom = {
        "qvl_ros.inputs": " ".join(str(p) for p in bags.paths),
        "qvl_ros.core.topics": " ".join(c.topic for c in bags.cameras),
        "qvl_ros.camera_names": " ".join(names),
        "qvl_ros.model": model.name,
        "qvl_ros.prompt": cfg.prompt,
        "qvl_ros.slop_ns": str(int(round(cfg.slop * 1e9))),
        "qvl_ros.stamps": cfg.stamps,
    }
    prompts_cache: dict[int, list[str]] = {}
    progress_bar = Progress(bags.estimated_frames(start_ns, stop_ns), progress, progress_interval, stream)
    halt = threading.Event()  # set by a signal, and when the run ends for any reason

    def stopped() -> bool:
        return halt.is_set() or stop.is_set()

    source = _SetSource(bags, cfg, model.device, start_ns, stop_ns, stopped)
    t0 = time.perf_counter()
    with _StopOnSignal(halt, cfg.handle_signals, stream) as signals:
        writer = FeatureBagWriter(output, captions=cfg.caption, custom_data=custom)
        exporter = None
        reader = None
        pending = None  # (batch, features, texts): computed, not yet written
        at_once = False  # a second Ctrl-C: close the files without writing more
        try:
            if export is not None:
                exporter = FeatureExporter(export, names, [c.topic for c in bags.cameras], model.name,
                                           cfg.prompt, kinds, cfg.caption,
                                           shard_bytes=int(cfg.shard_mb * (1 << 20)))

            def compute(batch):
                images = [list(s.items) for s in batch]
                prompts = prompts_cache.setdefault(len(batch), [cfg.prompt] * len(batch))
                fps = [list(s.fps) for s in batch] if cfg.clip_frames else None
                if cfg.caption:
                    feats, texts = model.encode_generate(images, prompts, max_new_tokens=cfg.max_new_tokens,
                                                         fps=fps)
                else:
                    feats, texts = model.encode(images, prompts, fps=fps), None
                return batch, feats, texts

            def emit(batch, feats, texts) -> None:
                for b, s in enumerate(batch):
                    tensors = sample_tensors(feats, b, names, kinds)  # waits for the device
                    msgs = []
                    for name, t in tensors:
                        dtype, shape, data = _host_storage(t)
                        msgs.append(writer.feature_tensor(name, dtype, shape, data))
                    writer.write_features(s.stamps, names, model.name, cfg.prompt, msgs, cfg.frame_id,
                                          getattr(s, "clip_stamps", ()))
                    if texts is not None:
                        writer.write_caption(s.stamps, names, model.name, cfg.prompt, texts[b], cfg.frame_id)
                        report.captions_written += 1
                    if exporter is not None:
                        exporter.add(s.stamps, tensors, texts[b] if texts is not None else None)
                    report.sets_written += 1
                progress_bar.update(source.frames_read, report.sets_written)
                if on_progress is not None:
                    on_progress(report)

            if cfg.prefetch is None:
                depth = 0 if model.device.type == "cpu" else 2
            else:
                depth = cfg.prefetch
            if depth > 0:
                threads = cfg.reader_threads if model.device.type == "cpu" and cfg.reader_threads else None
                reader = _ReadAhead(source, depth * cfg.batch, torch_threads=threads)
            # Software pipeline in one thread: batch i+1 is read and decoded, and batch i written,
            # while a GPU still computes batch i+1 (on a CPU the order changes nothing).
            batch: list = []
            for s in (reader if reader is not None else source):
                batch.append(s)
                if len(batch) == cfg.batch:
                    result = compute(batch)
                    batch = []
                    if pending is not None:
                        done, pending = pending, None
                        emit(*done)
                    pending = result
                    if stopped():
                        break
            if batch and not stopped():
                result = compute(batch)
                if pending is not None:
                    done, pending = pending, None
                    emit(*done)
                pending = result
            if pending is not None:
                done, pending = pending, None
                emit(*done)
        except KeyboardInterrupt:
            at_once = True
            report.error = "stopped at once by Ctrl-C"
            if signals.signum is None:
                signals.signum = signal.SIGINT
        except Exception as exc:  # a read or model failure mid-run: keep what is written
            report.error = f"{type(exc).__name__}: {exc}"
        finally:
            signals.closing = True  # from here on, signals no longer interrupt: close the files
            halt.set()
            if reader is not None:
                reader.close()
            if pending is not None and not at_once:
                try:  # a batch computed before the failure is still written
                    emit(*pending)
                except Exception as exc:
                    report.error = report.error or f"{type(exc).__name__}: {exc}"
            try:
                writer.close()
            finally:
                if exporter is not None:
                    exporter.close()
        report.interrupted = signals.signum
    report.elapsed_s = time.perf_counter() - t0
    progress_bar.finish(source.frames_read, report.sets_written)
    _fill_camera_stats(report, source)
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
    header = ("camera", "topic", "type", "frames", "used", "failed", "unmatched", "other drops", "left over")
    rows = []
    for cam in report.cameras:
        other = {r: v for r, v in cam.dropped.items() if r != "unmatched"}
        left = cam.pending + cam.in_unwritten_sets
        rows.append((cam.name, cam.topic, cam.msgtype, str(cam.frames), str(cam.used), str(cam.failed),
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
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `qvl-ros extract` (shared by `python -m qvl_ros.offline.extract`)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="rosbag2 recording (directory, or .mcap/.db3 file); several are merged in time order")
    parser.add_argument("-o", "--out", required=True, metavar="OUTPUT",
                        help="output rosbag2 directory (mcap) with /qvl/features (and /qvl/caption)")
    parser.add_argument("-t", "--topics", nargs="+", required=True, metavar="TOPIC",
                        help="camera topics (sensor_msgs/Image or CompressedImage), in camera order")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="camera names, one per topic (default: from the topic names)")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory, Hugging Face id in the local cache, or tiny / tiny-qwen2-vl "
                             "(default: the bundled tiny Qwen2.5-VL)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (auto: float32 on CPU, the checkpoint's on GPU)")
    parser.add_argument("--min-pixels", type=int, default=None, help="resize bound (default: the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=None, help="resize bound (default: the checkpoint's)")
    parser.add_argument("--slop", type=float, default=0.02,
                        help="largest stamp difference within a synchronized set, seconds (default 0.02)")
    parser.add_argument("--batch", type=int, default=4, help="synchronized sets per model call (default 4)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text prompt (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--features", nargs="+", default=["vision", "hidden"], choices=["vision", "hidden"],
                        help="tensors per set: vision (per camera) and/or hidden (decoder); default both")
    parser.add_argument("--caption", action="store_true", help="also generate a caption per set (/qvl/caption)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="caption length limit (default 32)")
    parser.add_argument("--start", default=None, metavar="SEC",
                        help="first recording time to read: bag time in seconds, or +SEC after the bag start")
    parser.add_argument("--end", default=None, metavar="SEC",
                        help="recording time to stop at (exclusive): bag time in seconds, or +SEC after the start")
    parser.add_argument("--stamps", default="header", choices=["header", "bag"],
                        help="synchronize on header stamps (default) or on recording times")
    parser.add_argument("--queue-size", type=int, default=64, help="frames kept per camera waiting for a match")
    parser.add_argument("--reorder", type=float, default=0.2,
                        help="seconds of out-of-order stamps tolerated per camera (default 0.2)")
    parser.add_argument("--frame-id", default="", help="header.frame_id of the output messages")
    parser.add_argument("--clip-frames", type=int, default=0, metavar="K",
                        help="0: still images (default); K >= 2: per camera a clip of its K frames ending at "
                             "the matched one (as the node's video.frames)")
    parser.add_argument("--clip-stride", type=int, default=1, metavar="S",
                        help="clips take every S-th frame of a camera (default 1; the node's video.stride)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also write the features as safetensors shards + index.json to DIR")
    parser.add_argument("--shard-mb", type=float, default=512.0, help="approximate export shard size in MB")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="batches read and decoded ahead in a thread (default: 0 on a CPU, 2 on a GPU)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite OUTPUT (and the export DIR)")
    parser.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                        help="progress display on stderr (auto: a bar on a terminal, else a line every 10 s)")
    parser.add_argument("--progress-interval", type=float, default=None, help="seconds between progress updates")


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    return ExtractConfig(
        inputs=args.inputs, output=args.out, topics=args.topics, camera_names=args.names, model=args.model,
        device=args.device, dtype=args.dtype, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        slop=args.slop, batch=args.batch, prompt=args.prompt, features=args.features, caption=args.caption,
        max_new_tokens=args.max_new_tokens, start=args.start, end=args.end, stamps=args.stamps,
        queue_size=args.queue_size, reorder=args.reorder, frame_id=args.frame_id, force=args.force,
        export=args.export, shard_mb=args.shard_mb, prefetch=args.prefetch,
        clip_frames=args.clip_frames, clip_stride=args.clip_stride)


def run_cli(args: argparse.Namespace, prog: str = "qvl-ros extract") -> int:
    """Run from parsed arguments; print progress and the summary on stderr; return the exit code."""
    from ..model.kernels import tune_cpu_allocator

    tune_cpu_allocator()  # a command-line process of its own: set before the model allocates
    try:
        report = extract(config_from_args(args), progress=args.progress, progress_interval=args.progress_interval)
    except ExtractError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    sys.stderr.write(format_summary(report) + "\n")
    sys.stderr.flush()
    if report.interrupted is not None:
        return EXIT_SIGNAL.get(report.interrupted, EXIT_FAILED)
    return EXIT_FAILED if report.error else EXIT_OK


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
