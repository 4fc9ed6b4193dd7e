"""The extraction engine: one run over opened recordings, from the checked plan to the closed
output (:func:`extract`, :class:`Extraction`), and the reports it returns.

The model, the export writer and the intake are imported where they are used: they import torch,
which a Ray driver (planning only) never loads."""
from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.model_call import ModelRequest, call_model, model_inputs
from ..core.stamps import stamp_ns
from ..ros.feature_msgs import check_kinds, hidden_rows_of, placeholder_token_ids, sample_tensors, set_info
from ..ros.tensor_msg import storage_array
from .bag_io import BagInputError, CameraBags, FeatureBagWriter, camera_names_for, qvl_typestore, vision_msgs_dir
from .console import Progress, StopOnSignal, fmt_stamp
from .options import ExtractConfig, ExtractError, check_options, custom_data, parse_time
from .output_guard import DiskFull, OutputGuard, check_writable, looks_like_export, looks_like_output
from .set_source import ReadAhead, SetSource, Window, batch_window_index

__all__ = ["CameraReport", "ExtractReport", "RunPlan", "Extraction", "extract", "plan_run", "check_outputs",
           "check_target", "looks_like_export", "remove_output", "resolve_model_path", "load_model",
           "load_interruptibly", "host_storage", "fill_camera_stats"]


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
    detections_written: int = 0  # Detection2DArray messages (one per set and camera, with --detect)
    objects_detected: int = 0  # detections in them
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


def check_target(path: Path, force: bool, what: str, looks_ok: Callable[[Path], bool]) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise ExtractError(f"{what} {path} exists; pass --force to overwrite it")
    if not looks_ok(path):
        raise ExtractError(f"{what} {path} exists and does not look like an earlier output "
                           f"(refusing to delete it, even with --force)")


def remove_output(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def resolve_model_path(spec: str | None) -> Path:
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


def load_model(cfg: ExtractConfig, path: Path):
    from ..model import BatchedQwenVL

    try:
        return BatchedQwenVL.from_pretrained(path, device=cfg.device, dtype=cfg.dtype,
                                             min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except Exception as exc:  # anything from config parsing to weight shapes or a missing device
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractError(f"cannot load model {path}: {reason}") from None


def host_storage(tensor):
    """(dtype name, shape, uint8 numpy bytes) of a host tensor, C order little-endian."""
    arr, dtype = storage_array(tensor, None)
    return dtype, arr.shape, arr.reshape(-1).view("u1")


@dataclass
class RunPlan:
    """A run's options after every check that needs neither the model nor an output file."""
    cfg: ExtractConfig
    names: list[str]
    kinds: list[str]
    output: Path
    export: Path | None
    start_ns: int | None
    stop_ns: int | None
    window: Window = field(default_factory=Window)  # the sets this run owns (all, unless a shard)
    input_names: list[str] | None = None  # the inputs as the metadata names them (default: as opened)


def plan_run(cfg: ExtractConfig, bags) -> RunPlan:
    """Check options, names, output and time range against the opened recordings."""
    try:
        kinds = check_kinds(list(cfg.features))
    except ValueError as exc:
        raise ExtractError(str(exc)) from None
    topics = list(cfg.topics)
    names = list(cfg.camera_names) if cfg.camera_names else camera_names_for(topics)
    if len(names) != len(topics) or len(set(names)) != len(names) or not all(names):
        raise ExtractError(f"--names needs one unique, non-empty name per topic; got {names} for {topics}")
    start_ns = parse_time(cfg.start, bags.start_ns, "start")
    stop_ns = parse_time(cfg.end, bags.start_ns, "end")
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
                               f"({fmt_stamp(bags.end_ns)}; pass --allow-empty to write an empty output anyway)")
        if stop_ns is not None and stop_ns <= bags.start_ns:
            raise ExtractError(f"--end {cfg.end} is at or before the start of the recordings "
                               f"({fmt_stamp(bags.start_ns)}; pass --allow-empty to write an empty output anyway)")
    return RunPlan(cfg, names, kinds, Path(cfg.output), Path(cfg.export) if cfg.export is not None else None,
                 start_ns, stop_ns)


def check_outputs(cfg: ExtractConfig, inputs: list[Path]) -> None:

    output = Path(cfg.output)
    export = Path(cfg.export) if cfg.export is not None else None
    for target in [output] + ([export] if export else []):
        if any(target.resolve() == p.resolve() for p in inputs):
            raise ExtractError(f"{target} is also an input")
    if export is not None and export.resolve() == output.resolve():
        raise ExtractError("--export must differ from --out")
    check_target(output, cfg.force, "output", looks_like_output)
    if export is not None:
        check_target(export, cfg.force, "export directory", looks_like_export)
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

    check_options(cfg)
    inputs = [Path(p) for p in cfg.inputs]
    check_outputs(cfg, inputs)
    try:
        qvl_typestore()  # the output's message definitions, read from msg/*.msg
    except FileNotFoundError as exc:
        raise ExtractError(str(exc)) from None
    check_detect_ready(cfg)
    try:
        bags = CameraBags(inputs, list(cfg.topics))
    except BagInputError as exc:
        raise ExtractError(str(exc)) from None
    try:
        plan = plan_run(cfg, bags)
        if model is None:
            model_path = resolve_model_path(cfg.model)
            model = load_interruptibly(cfg, model_path, (stream or sys.stderr) if cfg.announce_model_load else None)
        run = Extraction(plan, bags, model, stop if stop is not None else threading.Event(),
                          stream if stream is not None else sys.stderr, on_progress)
        return run.run(progress, progress_interval)
    finally:
        bags.close()


def check_detect_ready(cfg: ExtractConfig) -> None:
    """With --detect: the vision_msgs definitions for the bag and llguidance for the constrained
    answers are installed (ExtractError naming what is missing)."""
    if cfg.detect is None:
        return
    try:
        vision_msgs_dir()
    except FileNotFoundError as exc:
        raise ExtractError(f"--detect: {exc}") from None
    from ..model.constrained import require_llguidance

    try:
        require_llguidance()
    except ImportError as exc:
        raise ExtractError(f"--detect writes constrained (always well-formed) detections: {exc}") from None


def load_interruptibly(cfg: ExtractConfig, path: Path, announce=None):
    """Load the model; Ctrl-C during the load ends it with KeyboardInterrupt, also where the process
    started with SIGINT ignored (a background job) or a library swallowed the exception raised
    inside its code. ``announce``: a stream that gets "loading model ..." once Ctrl-C is handled."""
    if threading.current_thread() is not threading.main_thread():
        return load_model(cfg, path)
    seen: list[int] = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if announce is not None:
            announce.write(f"loading model {path} ...\n")
            announce.flush()
        model = load_model(cfg, path)
    finally:
        signal.signal(signal.SIGINT, previous)
    if seen:
        raise KeyboardInterrupt
    return model


def export_detections(cfg: ExtractConfig) -> dict | None:
    """What an export records of the detections asked for (None without)."""
    if cfg.detect is None:
        return None
    what = {"classes": list(cfg.detect)} if isinstance(cfg.detect, list) else {"query": cfg.detect}
    return {**what, "max": int(cfg.detect_max)}


class Extraction:
    """One run: opens the outputs, reads/computes/writes batches, closes everything."""
    def __init__(self, plan: RunPlan, bags, model, stop: threading.Event, stream, on_progress) -> None:

        cfg = plan.cfg
        self.plan, self.cfg, self.bags, self.model = plan, cfg, bags, model
        self.stop, self.stream, self.on_progress = stop, stream, on_progress
        cameras = [CameraReport(c.topic, name, c.short_type) for c, name in zip(bags.cameras, plan.names)]
        self.report = ExtractReport(output=plan.output, export=plan.export, cameras=cameras, model=model.name,
                                    device=str(model.device))
        self.halt = threading.Event()  # set by a signal, and when the run ends for any reason
        self.source = SetSource(bags, cfg, model.device, plan.start_ns, plan.stop_ns, self.stopped, plan.window)
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
        from .export import FeatureExporter

        plan, cfg = self.plan, self.cfg
        if cfg.force:
            remove_output(plan.output)
            if plan.export is not None:
                remove_output(plan.export)
        self.writer = FeatureBagWriter(plan.output, captions=cfg.caption, custom_data=self._custom_data(),
                                       detection_cameras=plan.names if cfg.detect is not None else ())
        self.guard = OutputGuard(plan.output)
        self.guard.start()
        if plan.export is not None:
            self.exporter = FeatureExporter(plan.export, plan.names, [c.topic for c in self.bags.cameras],
                                            self.model.name, cfg.prompt, plan.kinds, cfg.caption,
                                            shard_bytes=int(cfg.shard_mb * (1 << 20)),
                                            detections=export_detections(cfg))

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
        dets = None
        if self.cfg.detect is not None:  # one call for the batch; a clip is detected on its last frame
            dets = self.model.detect(model_inputs(batch)[0], self.cfg.detect, constrained=True,
                                     max_detections=int(self.cfg.detect_max))
        return batch, feats, texts, dets

    def _write_detections(self, s, cams) -> list:
        """A set's detections, per camera with its input header; their export arrays back."""
        from .export import detection_arrays

        for name, f, cam in zip(self.plan.names, s.items, cams):
            self.writer.write_detections(name, cam, stamp_ns(f.header.stamp), str(f.header.frame_id), max(s.stamps))
            self.report.detections_written += 1
            self.report.objects_detected += sum(d.box is not None or d.point is not None for d in cam.detections)
        return [detection_arrays(cam) for cam in cams]

    def _emit(self, batch, feats, texts, dets=None) -> None:
        """Write one computed batch (after making sure the disk can take it and still close)."""

        cfg, names, writer, report = self.cfg, self.plan.names, self.writer, self.report
        kinds, model = self.plan.kinds, self.model
        rows = []
        for b in range(len(batch)):
            tensors = sample_tensors(feats, b, names, kinds)  # waits for the device
            rows.append((tensors, [(name, *host_storage(t)) for name, t in tensors]))
        sizes = [sum(int(d.nbytes) for *_, d in storage) + 4096 for _, storage in rows]
        self.guard.before_write(sum(sizes), max(sizes))
        for b, (s, (tensors, storage)) in enumerate(zip(batch, rows)):
            msgs = [writer.feature_tensor(name, dtype, shape, data) for name, dtype, shape, data in storage]
            info = set_info(s, names, model, model.name, cfg.prompt, cfg.frame_id, self._geometry)
            writer.write_features(info, msgs, hidden_rows_of(feats, b, self._placeholder_ids, names, kinds))
            if texts is not None:
                writer.write_caption(info, texts[b])
                report.captions_written += 1
            arrays = self._write_detections(s, dets[b]) if dets is not None else None
            if self.exporter is not None:
                self.exporter.add(s.stamps, tensors, texts[b] if texts is not None else None, arrays)
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
        return ReadAhead(self.source, depth * cfg.batch, torch_threads=threads)

    # ------------------------------------------------------------------------------ the run
    def run(self, progress: str, progress_interval: float | None) -> ExtractReport:

        report, source = self.report, self.source
        self.progress = Progress(self.bags.estimated_frames(self.plan.start_ns, self.plan.stop_ns), progress,
                                 progress_interval, self.stream)
        self.pending = None  # (batch, features, texts): computed, not yet written
        reader = None
        at_once = False  # a second Ctrl-C: close the files without writing more
        t0 = time.perf_counter()
        with StopOnSignal(self.halt, self.cfg.handle_signals, self.stream) as signals:
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
        fill_camera_stats(report, source)
        report.damaged = list(self.bags.damaged)
        return report


def fill_camera_stats(report: ExtractReport, source: SetSource) -> None:
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
