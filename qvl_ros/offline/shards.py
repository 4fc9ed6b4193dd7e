"""Sharded extraction: the recordings' time split into shards that run independently and merge
into exactly what one pass of ``qvl-ros extract`` writes.

A shards directory (``--out`` of a sharded run) holds::

    plan.json                 the shards, their time ranges, the options and the model identity
    shard-00003/              one finished shard: an mcap feature bag
    shard-00003.export/       its feature export (when the run has --export)
    shard-00003.json          its completion marker, written last (counts, set signatures)
    .partial/                 shards in progress (a killed run leaves them; they are redone)

Shards and ownership
    Cuts are multiples of ``--shard-seconds`` of absolute recording time, and that is a multiple
    of ``--batch-window``, the grid a batch never crosses in any run; so every batch of a shard is
    a batch of the single-process run, with the same sets in it. Shard ``i`` owns the synchronized
    sets *born* in ``[cut_i, cut_i+1)``: completed by a frame recorded in that range. Birth is the
    key because it is where one pass meets the set, whatever the header stamps say (a recorder
    lagging the cameras, a timeline that restarts).

Overlap (warm-up) and why the sets are the same
    A shard reads from ``cut_i - overlap``: frames of the warm-up are decoded and synchronized,
    but the sets born there are only recorded as signatures (birth, stamps, clip stamps), not
    computed. The synchronizer's state after it emits a set S is fixed by S and the frames
    received after S's frames (everything older was used or dropped), so once the shard emits a
    set that one pass also emits, it emits what one pass emits from then on. The shard before it
    read exactly what one pass reads up to ``cut_i`` (and no flush), so its last sets are one
    pass's sets. The seam check compares the two: the shard's last warm-up sets must equal the
    last sets owned before its cut (all it saw of them, at least one; shards that own no set are
    passed over to the one before). A seam that fails (a camera silent across the cut, clips
    longer than the overlap) is redone with four times the overlap of its last run, at most back
    to the start of the run, where it is exact by construction. Only the last shard flushes the synchronizer at the end of the recordings.

Resume
    A shard is done when its marker exists (it is written after the bag and the export were
    renamed into place). A rerun of the same command skips done shards and redoes the others;
    options or a model that differ from ``plan.json`` are refused (``--force`` starts over).

Nothing outside the directory
    Resume, ``--force`` and merge refuse a shards directory holding anything a run does not
    write: a symbolic link anywhere, a marker that is not a regular file, a shard that is not a
    directory (:func:`qvl_ros.offline.shard_check.tree_problem`, naming the path). Every delete
    checks again that its path is no link, and files are written without following one.
    A marker records what its shard's bag and export hold (counts, stamp range, sha256), which
    `qvl-ros merge` verifies (:mod:`qvl_ros.offline.shard_check`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .engine import Extraction, plan_run
from .options import ExtractConfig
from .options import custom_data as one_pass_custom_data
from .set_source import Window
from .shard_check import sync_tree, write_new

__all__ = ["PLAN_NAME", "PLAN_FORMAT", "Shard", "ShardPlan", "ShardsError", "make_plan", "load_plan",
           "check_resume", "shard_cuts", "run_shard", "shard_done", "seam_problem", "tail_before", "read_marker",
           "default_overlap_ns", "looks_like_shards_dir", "shards_dir_problem", "shard_problem", "load_shard_marker"]

PLAN_NAME = "plan.json"
PLAN_FORMAT = "qvl_ros.shards/1"
PARTIAL = ".partial"
LOCK_NAME = ".lock"
OVERLAP_GROWTH = 4  # a failed seam is redone with this many times the overlap
TAIL_SETS = 128  # a shard's last sets kept (as signatures) for the seam check with the next one


class ShardsError(Exception):
    """A sharded run that cannot start or continue, or shards that cannot be merged (the text says why)."""


@dataclass
class Shard:
    """One time range of the run: owns the sets born in ``[start_ns, stop_ns)``."""

    index: int
    start_ns: int  # the run's start for the first shard
    stop_ns: int | None  # None: to the end of the recordings (or --end): the last shard
    frames: int = 0  # estimated camera frames in the range (for progress)

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass
class ShardPlan:
    """Everything a worker needs to run any shard, and what a rerun must match to resume."""

    options: dict  # ExtractConfig fields that shape the output (inputs as given, for the metadata)
    inputs: list  # absolute paths the workers read
    identity: dict  # what a resume compares: inputs, options, model
    model_path: str
    start_ns: int  # the run's read range
    stop_ns: int | None
    overlap_ns: int
    shard_ns: int
    shards: list = field(default_factory=list)
    export: bool = False
    export_dir: str | None = None  # --export of the run: where `qvl-ros merge` writes the export by default

    def config(self, **overrides):
        """The ExtractConfig of this run (``overrides`` replace fields)."""
        fields = dict(self.options)
        fields.pop("input_names", None)
        fields.update(inputs=list(self.inputs), model=self.model_path, output="")
        fields.update(overrides)
        return ExtractConfig(**fields)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["format"] = PLAN_FORMAT
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ShardPlan":
        d = dict(d)
        if d.pop("format", None) != PLAN_FORMAT:
            raise ShardsError(f"not a {PLAN_FORMAT} plan")
        d["shards"] = [Shard(**s) for s in d["shards"]]
        return cls(**d)


# ---------------------------------------------------------------------------------- identity
_OUTPUT_OPTIONS = ("topics", "camera_names", "device", "dtype", "min_pixels", "max_pixels", "slop", "batch",
                   "prompt", "features", "caption", "max_new_tokens", "start", "end", "stamps", "queue_size",
                   "reorder", "frame_id", "clip_frames", "clip_stride", "shard_mb", "max_input_pixels",
                   "batch_window", "policy", "reset_threshold", "max_rate", "expected_rates", "detect_classes",
                   "detect_query", "detect_max")


def _fingerprint(path: Path, edge: int = 1 << 20) -> str:
    """sha256 of a file's first and last MiB (the whole file when it is smaller): cheap on a
    recording or a checkpoint of any size, and it tells a file rewritten at the same size."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            digest.update(f.read(edge))
    return digest.hexdigest()


def _files_identity(paths, base: Path | None) -> dict:
    """{name: [size, fingerprint]} of files (names relative to ``base``)."""
    return {str(p.relative_to(base)) if base is not None else p.name: [p.stat().st_size, _fingerprint(p)]
            for p in sorted(paths)}


def _input_identity(path: Path) -> dict:
    """A recording as a rerun must find it again: its files' names, sizes and fingerprints."""
    if path.is_dir():
        return {"path": str(path.resolve()), "files": _files_identity((p for p in path.rglob("*") if p.is_file()), path)}
    return {"path": str(path.resolve()), "files": _files_identity([path], None)}


def _model_identity(path: Path) -> dict:
    """The checkpoint: every file of its directory (weights, config, tokenizer, preprocessor and
    generation settings) by name, size and fingerprint."""
    files = (p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"path": str(path.resolve()), "files": _files_identity(files, path)}


def _options(cfg) -> dict:
    out = {}
    for name in _OUTPUT_OPTIONS:
        value = getattr(cfg, name)
        out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
            any(isinstance(x, dict) for x in old + new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} in the plan, {new!r} now"]


# ------------------------------------------------------------------------------------- plan
def shard_cuts(start_ns: int, end_ns: int, shard_ns: int) -> list[int]:
    """Multiples of ``shard_ns`` strictly inside ``(start_ns, end_ns)``."""
    first = (start_ns // shard_ns + 1) * shard_ns
    return list(range(first, end_ns, shard_ns))


def default_overlap_ns(cfg, bags) -> int:
    """Warm-up before a cut: 2 s, or more for a wide slop, a long reorder tolerance or long clips
    (in frame periods of the slowest camera, estimated from the recordings)."""
    span = max(1, bags.end_ns - bags.start_ns)
    period = max(span / max(1, c.count - 1) for c in bags.cameras)
    need = [2e9, 4 * cfg.slop * 1e9 + 2 * cfg.reorder * 1e9]
    if cfg.clip_frames:
        need.append((cfg.clip_frames * cfg.clip_stride + 4) * period)
    return int(math.ceil(max(need)))


def make_plan(cfg, bags, xplan, model_path: Path, shard_seconds: float, overlap: float | None) -> ShardPlan:
    """The plan of a run over the opened recordings (``xplan``: extract's checked options)."""
    window_ns = int(round(cfg.batch_window * 1e9))
    shard_ns = int(round(shard_seconds * 1e9))
    if window_ns > 0:  # cut on the batch grid: a whole number of windows per shard
        shard_ns = max(window_ns, shard_ns // window_ns * window_ns)
    start = xplan.start_ns if xplan.start_ns is not None else bags.start_ns
    end = xplan.stop_ns if xplan.stop_ns is not None else bags.end_ns
    cuts = shard_cuts(start, end, max(1, shard_ns))
    bounds = [start] + cuts
    shards = []
    for i, lo in enumerate(bounds):
        hi = bounds[i + 1] if i + 1 < len(bounds) else None
        frames = bags.estimated_frames(lo, hi if hi is not None else end)
        shards.append(Shard(i, lo, hi, frames))
    options = _options(cfg)
    options["camera_names"] = list(xplan.names)
    overlap_ns = int(round(overlap * 1e9)) if overlap is not None else default_overlap_ns(cfg, bags)
    identity = {"inputs": [_input_identity(Path(p)) for p in cfg.inputs], "options": options,
                "model": _model_identity(model_path), "export": cfg.export is not None,
                "shard_ns": shard_ns, "overlap_ns": overlap_ns}
    options = dict(options, input_names=[str(p) for p in cfg.inputs])
    return ShardPlan(options=options, inputs=[str(Path(p).resolve()) for p in cfg.inputs], identity=identity,
                     model_path=str(model_path.resolve()), start_ns=start, stop_ns=xplan.stop_ns,
                     overlap_ns=overlap_ns, shard_ns=shard_ns, shards=shards, export=cfg.export is not None,
                     export_dir=str(Path(cfg.export).resolve()) if cfg.export is not None else None)


def load_plan(root: Path) -> ShardPlan:
    path = Path(root) / PLAN_NAME
    try:
        return ShardPlan.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ShardsError(f"{root} has no {PLAN_NAME}: not a shards directory of qvl-ros extract") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ShardsError(f"{path} cannot be read: {exc}") from None


def save_plan(root: Path, plan: ShardPlan) -> None:
    _write_json(Path(root) / PLAN_NAME, plan.to_json(), indent=1)


def check_resume(old: ShardPlan, new: ShardPlan, root: Path) -> None:
    """Raise ShardsError unless ``new`` is the same run as the plan found in ``root``."""
    diffs = _differences(old.identity, new.identity)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise ShardsError(f"{root} holds a run with other inputs, options or model ({shown}); rerun with the "
                          f"same command to resume it, or pass --force to delete it and start over")


def looks_like_shards_dir(path: Path) -> bool:
    """A directory ``--force`` may delete: a plan and nothing but shard files."""
    return shards_dir_problem(path) is None


def shards_dir_problem(path: Path) -> str | None:
    """Why ``path`` is no shards directory that may be resumed, deleted or merged (None: it is one)."""
    from .shard_check import tree_problem

    path = Path(path)
    if not path.is_symlink() and path.is_dir() and not (path / PLAN_NAME).is_file():
        return f"no {path / PLAN_NAME}"
    return tree_problem(path)


class DirectoryLock:
    """One run or merge at a time in a shards directory: an flock on its ``.lock`` file, released
    by the kernel however the process ends."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        except OSError as exc:  # ELOOP: a link, which would make the lock file elsewhere
            raise ShardsError(f"{self.path} cannot be the lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShardsError(f"another run or merge is working in {self.path.parent}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "DirectoryLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clear_shards_dir(root: Path) -> None:
    """Delete a run's files (``--force``), keeping the lock file that the caller holds. The
    directory has passed :func:`shards_dir_problem`; a link found now is only unlinked."""
    for entry in Path(root).iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _write_json(path: Path, data: dict, indent: int | None = None) -> None:
    """Whole or not at all: a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(data, indent=indent) if indent else json.dumps(data, separators=(",", ":"))
    write_new(tmp, text + "\n")
    os.replace(tmp, path)


def _remove_owned(root: Path, path: Path) -> None:
    """Delete a shard's file or directory in ``root`` (or in its .partial): ShardsError, naming the
    path, when it or the directory holding it is a link (the delete would reach outside)."""
    for place in (path.parent, path):
        if place.is_symlink():
            raise ShardsError(f"{place} is a symbolic link (to {place.readlink()}); refusing to delete "
                              f"through it: remove it, or pass --force to start over in {root}")
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ----------------------------------------------------------------------------------- shards
def marker_path(root: Path, shard: Shard) -> Path:
    return Path(root) / f"{shard.name}.json"


def read_marker(root: Path, shard: Shard, export: bool = False) -> dict | None:
    """The shard's marker, checked (:func:`qvl_ros.offline.shard_check.load_marker`); None when it
    is absent or cannot vouch for its shard."""
    try:
        return load_shard_marker(root, shard, export)
    except ShardsError:
        return None


def load_shard_marker(root: Path, shard: Shard, export: bool = False) -> dict:
    """The shard's marker, checked; ShardsError naming the file and why it cannot vouch."""
    from .shard_check import MarkerError, load_marker

    try:
        return load_marker(marker_path(root, shard), shard.index, export)
    except MarkerError as exc:
        raise ShardsError(str(exc)) from None


def shard_done(root: Path, plan: ShardPlan, shard: Shard) -> bool:
    """The marker is there and the outputs it vouches for too."""
    return shard_problem(root, plan, shard) is None


def shard_problem(root: Path, plan: ShardPlan, shard: Shard) -> str | None:
    """Why the shard is not done (None: it is)."""
    root = Path(root)
    try:
        load_shard_marker(root, shard, plan.export)
    except ShardsError as exc:
        return str(exc)
    if not (root / shard.name / "metadata.yaml").is_file():
        return f"{root / shard.name / 'metadata.yaml'} does not exist"
    if plan.export and not (root / f"{shard.name}.export" / "index.json").is_file():
        return f"{root / f'{shard.name}.export' / 'index.json'} does not exist"
    return None


def discard_shard(root: Path, shard: Shard) -> None:
    """Remove a shard's outputs (marker first: without it nothing else counts)."""
    root = Path(root)
    for path in (marker_path(root, shard), root / shard.name, root / f"{shard.name}.export",
                 root / PARTIAL / shard.name, root / PARTIAL / f"{shard.name}.export"):
        _remove_owned(root, path)


def overlap_for(root: Path, plan: ShardPlan, shard: Shard) -> int:
    """The overlap a shard runs with: the plan's, or a larger one a failed seam asked for."""
    try:
        return max(plan.overlap_ns, int((Path(root) / PARTIAL / f"{shard.name}.overlap").read_text()))
    except (FileNotFoundError, ValueError):
        return plan.overlap_ns


def grow_overlap(root: Path, plan: ShardPlan, shard: Shard) -> int:
    """Discard the shard and let its next run read OVERLAP_GROWTH times further back than its last
    run did (at most to the run's start, where a shard is one pass by construction)."""
    marker = read_marker(root, shard) or {}
    current = max(overlap_for(root, plan, shard), int(marker.get("overlap_ns") or 0))
    wider = min(current * OVERLAP_GROWTH, max(current, shard.start_ns - plan.start_ns))
    discard_shard(root, shard)
    _partial_dir(Path(root))
    write_new(Path(root) / PARTIAL / f"{shard.name}.overlap", str(wider))
    return wider


def _partial_dir(root: Path) -> Path:
    """``root/.partial``, made if needed; ShardsError when it is a link or not a directory."""
    partial = root / PARTIAL
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise ShardsError(f"{partial} is a symbolic link or not a directory; refusing to write through it")
    partial.mkdir(exist_ok=True)
    return partial


def seam_problem(plan: ShardPlan, tail: list, after: dict) -> str | None:
    """Why shard ``after`` may not follow the sets before its cut (None: its sets continue one pass's).

    ``tail``: the last sets owned before the cut (:func:`tail_before`). ``after``'s last warm-up
    sets must be those: every warm-up set born since the first of them, and at least one. A shard
    keeps only its last TAIL_SETS + 1 warm-up sets: births only grow in reading order, so those
    are all the ones born since the tail's first when the seam holds, and one too many when not."""
    if after["read_start_ns"] <= plan.start_ns:
        return None  # read from the run's start: it is one pass
    warm = after["warmup_sets"]
    if not warm or not tail:
        return "no synchronized set was completed in the overlap"
    common = [s for s in warm if s[0] >= tail[0][0]]
    if not common:
        return "the overlap and the previous shard's end share no set"
    if common != tail[-len(common):]:
        return "the sets completed in the overlap differ from the previous shard's"
    return None


def run_shard(root: Path, plan: ShardPlan, index: int, model, stop=None,
              on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Extract one shard into ``root``; return its marker. Raises ShardsError when the shard did
    not finish (interrupted, or an error: the text says which); its partial files stay in
    ``.partial`` and are removed by the next attempt."""
    import threading

    from .bag_io import BagInputError, CameraBags

    root = Path(root)
    shard = plan.shards[index]
    partial = _partial_dir(root)
    out, export = partial / shard.name, partial / f"{shard.name}.export"
    discard_shard(root, shard)
    cfg = plan.config(output=out, export=export if plan.export else None, force=False, handle_signals=False,
                      allow_empty=True, announce_model_load=False)
    last = shard.index == len(plan.shards) - 1
    overlap = overlap_for(root, plan, shard)
    read_start = plan.start_ns if shard.index == 0 else max(plan.start_ns, shard.start_ns - overlap)
    stop_event = stop if stop is not None else threading.Event()
    try:
        bags = CameraBags(plan.inputs, list(cfg.topics))
    except BagInputError as exc:
        raise ShardsError(str(exc)) from None
    try:
        xplan = plan_run(cfg, bags)
        window = Window(own_from_ns=shard.start_ns if shard.index else -(1 << 63),
                            tail_keep=0 if last else TAIL_SETS, warmup_keep=TAIL_SETS + 1, flush_at_end=last)
        xplan = dataclasses.replace(xplan, start_ns=read_start, stop_ns=shard.stop_ns if not last else plan.stop_ns,
                                    window=window)
        xplan.input_names = list(plan.options["input_names"])
        with open(os.devnull, "w") as quiet:
            progress = (None if on_progress is None
                        else lambda report: on_progress(run.source.frames_read, report.sets_written))
            run = Extraction(xplan, bags, model, stop_event, quiet, progress)
            report = run.run("none", None)
    finally:
        bags.close()
    if report.interrupted is not None or stop_event.is_set():
        raise ShardsError(f"{shard.name} interrupted")
    if report.error or not report.output_complete:
        raise ShardsError(f"{shard.name} failed: {report.error or 'the output could not be closed'}")
    source = run.source
    marker = {
        "index": shard.index, "start_ns": shard.start_ns, "stop_ns": shard.stop_ns, "read_start_ns": read_start,
        "overlap_ns": overlap, "sets": report.sets_written, "captions": report.captions_written,
        "frames_read": source.frames_read, "failed": [c.failed for c in report.cameras],
        "elapsed_s": round(report.elapsed_s, 3), "model": report.model, "device": report.device,
        "device_name": device_name(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "host": os.uname().nodename, "pid": os.getpid(),
        "warmup_sets": list(source.warmup_sets), "tail_sets": list(source.tail_sets),
    }
    marker.update(_outputs_summary(out, export if plan.export else None))
    if marker["bag"]["sets"] != marker["sets"]:
        raise ShardsError(f"{shard.name} failed: its bag holds {marker['bag']['sets']} sets, the run wrote "
                          f"{marker['sets']}")
    for path in (out, export) if plan.export else (out,):
        sync_tree(path)  # on disk before the marker vouches for it (a power loss, not only a kill)
    os.replace(out, root / shard.name)
    if plan.export:
        os.replace(export, root / f"{shard.name}.export")
    sync_tree(root, files=False)
    _write_json(marker_path(root, shard), marker)
    (partial / f"{shard.name}.overlap").unlink(missing_ok=True)
    return marker


def _outputs_summary(bag: Path, export: Path | None) -> dict:
    """What the marker records of a closed shard's outputs (read back, as merge reads them)."""
    from .shard_check import bag_summary, export_summary

    summary = {"bag": bag_summary(bag)}
    if export is not None:
        summary["export"] = export_summary(export)
    return summary


def tail_before(markers: list, index: int) -> list | None:
    """The last sets owned before shard ``index``'s cut, as signatures: the kept tail of the nearest
    earlier shard that owns sets (the shards between own none); [] when no earlier shard owns a
    set; None while one of those shards is not done."""
    for j in range(index - 1, -1, -1):
        if markers[j] is None:
            return None
        if markers[j]["tail_sets"]:
            return markers[j]["tail_sets"]
    return []


def device_name(device) -> str:
    """What computed a shard: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine() or "cpu"


def seam_failures(root: Path, plan: ShardPlan) -> list[tuple[int, str]]:
    """(shard index, reason) for every done shard whose seam with the done shards before it fails."""
    markers = [read_marker(root, s) if shard_done(root, plan, s) else None for s in plan.shards]
    bad = []
    for i in range(1, len(markers)):
        tail = tail_before(markers, i) if markers[i] is not None else None
        if tail is not None:
            problem = seam_problem(plan, tail, markers[i])
            if problem is not None:
                bad.append((i, problem))
    return bad


def pending_shards(root: Path, plan: ShardPlan) -> list[Shard]:
    return [s for s in plan.shards if not shard_done(root, plan, s)]


def custom_data(plan: ShardPlan, model_name: str) -> dict[str, str]:
    """The bag metadata one pass writes (:func:`qvl_ros.offline.extract.custom_data`)."""
    cfg = plan.config()
    return one_pass_custom_data(plan.options["input_names"], cfg.topics, plan.options["camera_names"], model_name, cfg)

