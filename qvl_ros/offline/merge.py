"""`qvl-ros merge`: the shards of a sharded extraction as one bag (and one export).

    qvl-ros merge SHARDS_DIR --out OUTPUT [--export DIR] [--force]

Writes OUTPUT as one-process ``qvl-ros extract`` of the same inputs and options writes it: the
same messages (serialized bytes, so the same feature tensor bytes), in the same order, with the
same bag metadata; and the same export (the same tensors and captions, in files split at the
same sets), to the run's ``--export`` directory or ``--export DIR``. Refuses when a shard is missing (the extraction has to be rerun to finish it) or when a
seam between two shards fails its check (rerunning the extraction redoes that shard).

OUTPUT is written as extraction writes its output: an ``EXTRACTION_INCOMPLETE`` marker until it
is closed, ``--force`` to replace an earlier output. Exit status: 0 merged; 1 failed while
writing; 2 a problem found before starting.

Nothing read is trusted: the shards directory must hold only what a run writes (no link, see
:func:`qvl_ros.offline.shard_check.tree_problem`); each shard's bag must hold the message and
set counts and the stamp range its marker recorded at the shard's close (checked before writing)
and, message by message, the content whose sha256 the marker holds (checked while copying), and
each export file its recorded sha256. A shard that differs, or a read that fails, stops the merge
with exit status 1 and leaves OUTPUT (and the export) marked incomplete. The counts reported are
those written. ``--force`` deletes only what looks like an earlier output of this tool and is no
link (an export directory needs an ``index.json`` of the export format).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .engine import check_target
from .options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ExtractError

__all__ = ["merge", "add_arguments", "run_cli", "main"]


def _check(root: Path, out: Path, export: Path | None, force: bool):
    from .output_guard import check_writable, looks_like_export, looks_like_output
    from .shards import ShardsError, load_plan, seam_failures, shard_problem, shards_dir_problem

    problem = shards_dir_problem(root)
    if problem:
        raise ExtractError(f"{root} is not a shards directory that can be merged: {problem}")
    try:
        plan = load_plan(root)
    except ShardsError as exc:
        raise ExtractError(str(exc)) from None
    missing = [(s, why) for s in plan.shards if (why := shard_problem(root, plan, s))]
    if missing:
        shown = "; ".join(f"{s.name}: {why}" for s, why in missing[:3]) + ("; ..." if len(missing) > 3 else "")
        raise ExtractError(f"{len(missing)} of {len(plan.shards)} shards are not done ({shown}); rerun the "
                           f"extraction command to finish them")
    bad = seam_failures(root, plan)
    if bad:
        index, problem = bad[0]
        raise ExtractError(f"the seam before {plan.shards[index].name} fails its check ({problem}); rerun the "
                           f"extraction command to redo it")
    markers = _markers(root, plan)
    kinds = sorted({f"{m['device'].split(':')[0]} {m.get('dtype', '?')}" for m in markers})
    if len(kinds) > 1:
        raise ExtractError(f"the shards were computed on different devices or dtypes ({', '.join(kinds)}): no "
                           f"one-process run writes those results; extract again with --force on one kind")
    if export is not None and not plan.export:
        raise ExtractError(f"--export: the shards in {root} were extracted without --export")
    for target in [out] + ([export] if export else []):
        if target.resolve() == root.resolve() or root.resolve() in target.resolve().parents:
            raise ExtractError(f"{target} is inside the shards directory")
    if export is not None and export.resolve() == out.resolve():
        raise ExtractError("--export must differ from --out")
    check_target(out, force, "output", looks_like_output)
    if export is not None:
        check_target(export, force, "export directory", looks_like_export)
    for target, what in ((out, "--out"), (export, "--export")):
        if target is not None:
            try:
                check_writable(target)
            except OSError as exc:
                raise ExtractError(f"{what} {target} cannot be created: {exc.strerror or exc}") from None
    for shard, marker in zip(plan.shards, markers):
        problem = _bag_matches_marker(root / shard.name, marker["bag"])
        if problem is None and export is not None:
            problem = _export_matches_marker(root / f"{shard.name}.export", marker["export"], check_bytes=False)
        if problem:
            raise ExtractError(f"{shard.name} is not the shard its marker vouches for ({problem}); rerun the "
                               f"extraction with --force to compute it again")
    return plan, markers


def _markers(root: Path, plan) -> list[dict]:
    from .shards import ShardsError, load_shard_marker

    try:
        return [load_shard_marker(root, s, plan.export) for s in plan.shards]
    except ShardsError as exc:
        raise ExtractError(str(exc)) from None


def _plan_export(root: Path) -> Path | None:
    """The run's --export from plan.json, as it was resolved when the run started: a path that
    resolves elsewhere now (a link put on the way) is refused, naming it."""
    from .shards import ShardsError, load_plan

    try:
        named = load_plan(root).export_dir
    except ShardsError:
        return None
    if named is None:
        return None
    path = Path(str(named))
    if not path.is_absolute() or path.resolve() != path:
        raise ExtractError(f"{root / 'plan.json'} names the export directory {named}, which resolves to "
                           f"{path.resolve()} (not the absolute path it was when the run started); refusing "
                           f"to write there: pass --export DIR")
    return path


def _bag_matches_marker(path: Path, recorded: dict) -> str | None:
    """Counts and stamp range of a shard bag's metadata against its marker (None: they agree)."""
    from rosbags.rosbag2 import Reader

    from .bag_io import FEATURES_TOPIC

    try:
        with Reader(path) as reader:
            sets = sum(c.msgcount for c in reader.connections if c.topic == FEATURES_TOPIC)
            got = (reader.message_count, sets)
            span = (reader.start_time, reader.end_time - 1) if reader.message_count else (None, None)
    except Exception as exc:
        return f"its bag cannot be read: {type(exc).__name__}: {exc}"
    if got != (recorded["messages"], recorded["sets"]):
        return (f"its bag holds {got[0]} messages, {got[1]} sets; the marker records {recorded['messages']} "
                f"messages, {recorded['sets']} sets")
    want = (recorded.get("first_ns"), recorded.get("last_ns"))
    if recorded["sets"] and span != want:
        return f"its bag's stamps span {span[0]}..{span[1]} ns; the marker records {want[0]}..{want[1]} ns"
    return None


def _export_matches_marker(path: Path, recorded: dict, check_bytes: bool) -> str | None:
    """The export's files against the marker: their names, and (``check_bytes``) their sha256."""
    from .shard_check import file_sha256

    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if names != sorted(recorded):
        return f"its export holds {names}, the marker records {sorted(recorded)}"
    for name in names if check_bytes else ():
        if file_sha256(path / name) != recorded[name]:
            return f"{path / name} differs from what the marker records (sha256)"
    return None


def _bag_messages(path: Path):
    """(topic, recording time, serialized message) of a shard bag, in its stored order."""
    from rosbags.rosbag2 import Reader

    with Reader(path) as reader:
        for conn, t, raw in reader.messages():
            yield conn.topic, t, bytes(raw)


def _set_detections(f, cameras: list, first_set: int, n: int) -> list:
    """Per set of a shard export's file, per camera (boxes, scores, labels) (export.detection_arrays)."""
    per_set = [[] for _ in range(n)]
    for camera in cameras:
        boxes, scores, sets = (f.get_tensor(f"detections/{camera}/{w}") for w in ("boxes", "scores", "set"))
        labels = json.loads((f.metadata() or {}).get(f"detections/{camera}/labels", "[]"))
        for i in range(n):
            keep = (sets == first_set + i).nonzero().flatten()
            per_set[i].append((boxes[keep], scores[keep], [labels[j] for j in keep.tolist()]))
    return per_set


def _export_rows(path: Path):
    """(camera stamps, [(name, tensor)], caption or None, detections or None) of every set of a
    shard export, in order."""
    from safetensors import safe_open

    meta = json.loads((path / "index.json").read_text())
    names = [f"vision/{c}" for c in meta["camera_names"] if "vision" in meta["features"]]
    names += ["hidden"] if "hidden" in meta["features"] else []  # the order extraction adds them in
    for entry in meta["shards"]:
        with safe_open(str(path / entry["file"]), framework="pt") as f:
            keys = set(f.keys())
            arrays = {k: f.get_tensor(k) for k in names}
            lengths = {k: f.get_tensor(f"{k}:length") for k in names if f"{k}:length" in keys}
            stamps = f.get_tensor("camera_stamps_ns").tolist()
            texts = json.loads((f.metadata() or {}).get("captions", "null")) if meta.get("captions") else None
            dets = (_set_detections(f, meta["detections"]["cameras"], entry["first_set"], len(stamps))
                    if meta.get("detections") else None)
        for i, camera_stamps in enumerate(stamps):
            row = [(k, arrays[k][i, : int(lengths[k][i])] if k in lengths else arrays[k][i]) for k in names]
            yield camera_stamps, row, (texts[i] if texts is not None else None), (dets[i] if dets is not None else None)


class MergeError(Exception):
    """Merging stopped while writing (a shard that differs from its marker, a read error): the
    output keeps its incomplete marker."""


def merge(root, out, export=None, force: bool = False) -> dict:
    """Merge the shards in ``root`` into the bag ``out`` (and the export ``export``, by default the
    run's --export); returns counts of what was written (with ``export``: the directory written,
    or None). Holds the shards directory's lock: no run works in it meanwhile."""
    from .shards import DirectoryLock, ShardsError, load_plan, shards_dir_problem

    problem = shards_dir_problem(Path(root))
    if problem:  # before a lock file is made in it
        raise ExtractError(f"{root} is not a shards directory that can be merged: {problem}")
    try:
        load_plan(root)
        lock = DirectoryLock(root).acquire()
    except ShardsError as exc:
        raise ExtractError(str(exc)) from None
    with lock:
        return _merge(Path(root), Path(out), export, force)


def _merge(root: Path, out: Path, export, force: bool) -> dict:
    from .bag_io import FEATURES_TOPIC
    from .output_guard import looks_like_export, looks_like_output, remove_earlier_output

    export = Path(export) if export is not None else _plan_export(root)
    plan, markers = _check(root, out, export, force)
    if force:
        try:
            remove_earlier_output(out, looks_like_output, "output")
            if export is not None:
                remove_earlier_output(export, looks_like_export, "export directory")
        except OSError as exc:
            raise ExtractError(str(exc.strerror or exc)) from None
    written = _write(root, out, export, plan, markers)
    return {"shards": len(plan.shards), "messages": sum(written.values()), "sets": written[FEATURES_TOPIC],
            "export": export, "devices": sorted({m.get("device_name", "?") for m in markers})}


def _write(root: Path, out: Path, export: Path | None, plan, markers: list[dict]) -> dict:
    """Copy every shard's messages (and export rows), verifying each shard against its marker as
    it is read; the output is marked complete only when all of it was written and verified.
    Returns the messages written per topic."""
    from .bag_io import FeatureBagWriter
    from .export import FeatureExporter
    from .output_guard import INCOMPLETE_MARKER, OutputGuard
    from .shard_check import BagDigest
    from .engine import export_detections
    from .shards import custom_data

    model_name = markers[0]["model"]
    cfg = plan.config()
    writer = FeatureBagWriter(out, captions=cfg.caption, custom_data=custom_data(plan, model_name),
                              detection_cameras=plan.options["camera_names"] if cfg.detect is not None else ())
    guard = OutputGuard(out, "qvl-ros merge")
    guard.start()
    exporter, verified, closed = None, False, False
    try:
        if export is not None:
            from ..ros.feature_msgs import check_kinds

            exporter = FeatureExporter(export, plan.options["camera_names"], list(cfg.topics), model_name,
                                       cfg.prompt, check_kinds(list(cfg.features)), cfg.caption,
                                       shard_bytes=int(cfg.shard_mb * (1 << 20)), detections=export_detections(cfg))
            (export / INCOMPLETE_MARKER).write_text(guard.marker_text())
        for shard, marker in zip(plan.shards, markers):
            digest = BagDigest()
            for topic, t, raw in _bag_messages(root / shard.name):
                digest.add(topic, t, raw)
                writer.write_raw(topic, t, raw)
            if digest.summary() != {k: marker["bag"].get(k) for k in digest.summary()}:
                raise MergeError(f"{shard.name}: the messages read differ from what its marker recorded at the "
                                 f"shard's close ({digest.summary()} read, {marker['bag']} recorded)")
            if exporter is not None:
                problem = _export_matches_marker(root / f"{shard.name}.export", marker["export"], check_bytes=True)
                if problem:
                    raise MergeError(f"{shard.name}: {problem}")
                for camera_stamps, row, text, dets in _export_rows(root / f"{shard.name}.export"):
                    exporter.add(camera_stamps, row, text, dets)
        verified = True
    finally:
        guard.release()
        try:
            writer.close()
            if exporter is not None:
                exporter.close()
            closed = True
        finally:
            if closed and verified:
                guard.finish()
                if export is not None:
                    (export / INCOMPLETE_MARKER).unlink(missing_ok=True)
    return dict(writer.counts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", metavar="SHARDS_DIR", help="the --out directory of a sharded qvl-ros extract run")
    parser.add_argument("-o", "--out", required=True, metavar="OUTPUT", help="the merged rosbag2 directory (mcap)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="where to write the merged feature export (default: the run's --export DIR; "
                             "the run must have had --export)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite OUTPUT (and DIR): an earlier output")


def run_cli(args: argparse.Namespace, prog: str = "qvl-ros merge") -> int:

    try:
        counts = merge(args.shards, args.out, args.export, args.force)
    except ExtractError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except MergeError as exc:
        sys.stderr.write(f"{prog}: failed: {exc}; {args.out} is left marked incomplete\n")
        return EXIT_FAILED
    except Exception as exc:
        sys.stderr.write(f"{prog}: failed: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED
    sys.stderr.write(f"{counts['shards']} shards merged: {counts['sets']} sets, {counts['messages']} messages "
                     f"to {args.out}" + (f", export {counts['export']}" if counts["export"] else "") + "\n")
    if len(counts["devices"]) > 1:
        sys.stderr.write(f"note: the shards were computed on {len(counts['devices'])} kinds of device "
                         f"({'; '.join(counts['devices'])}); a one-process run on one of them may differ in the "
                         f"last bits\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_ros.offline.merge", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv), prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
