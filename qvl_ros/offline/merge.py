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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .engine import check_target, looks_like_export, remove_output
from .options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ExtractError

__all__ = ["merge", "add_arguments", "run_cli", "main"]


def _check(root: Path, out: Path, export: Path | None, force: bool):
    from .output_guard import check_writable, looks_like_output
    from .shards import ShardsError, load_plan, pending_shards, read_marker, seam_failures

    try:
        plan = load_plan(root)
    except ShardsError as exc:
        raise ExtractError(str(exc)) from None
    missing = pending_shards(root, plan)
    if missing:
        names = ", ".join(s.name for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ExtractError(f"{len(missing)} of {len(plan.shards)} shards are not done ({names}); rerun the "
                           f"extraction command to finish them")
    bad = seam_failures(root, plan)
    if bad:
        index, problem = bad[0]
        raise ExtractError(f"the seam before {plan.shards[index].name} fails its check ({problem}); rerun the "
                           f"extraction command to redo it")
    markers = [read_marker(root, s) for s in plan.shards]
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
    return plan


def _bag_messages(path: Path):
    """(topic, recording time, serialized message) of a shard bag, in its stored order."""
    from rosbags.rosbag2 import Reader

    with Reader(path) as reader:
        for conn, t, raw in reader.messages():
            yield conn.topic, t, bytes(raw)


def _export_rows(path: Path):
    """(camera stamps, [(name, tensor)], caption or None) of every set of a shard export, in order."""
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
        for i, camera_stamps in enumerate(stamps):
            row = [(k, arrays[k][i, : int(lengths[k][i])] if k in lengths else arrays[k][i]) for k in names]
            yield camera_stamps, row, (texts[i] if texts is not None else None)


def merge(root, out, export=None, force: bool = False) -> dict:
    """Merge the shards in ``root`` into the bag ``out`` (and the export ``export``, by default the
    run's --export); returns counts (with ``export``: the directory written, or None). Holds the
    shards directory's lock: no run works in it meanwhile."""
    from .shards import DirectoryLock, ShardsError, load_plan

    try:
        load_plan(root)  # a shards directory, before a lock file is made in it
        lock = DirectoryLock(root).acquire()
    except ShardsError as exc:
        raise ExtractError(str(exc)) from None
    with lock:
        return _merge(root, out, export, force)


def _merge(root, out, export, force: bool) -> dict:
    from .bag_io import FeatureBagWriter
    from .export import FeatureExporter
    from .output_guard import OutputGuard
    from .shards import custom_data, read_marker

    from .shards import ShardsError, load_plan

    root, out = Path(root), Path(out)
    if export is None:
        try:
            export = load_plan(root).export_dir  # the run's --export
        except ShardsError:
            pass
    export = Path(export) if export is not None else None
    plan = _check(root, out, export, force)
    markers = [read_marker(root, s) for s in plan.shards]
    model_name = markers[0]["model"]
    cfg = plan.config()
    if force:
        remove_output(out)
        if export is not None:
            remove_output(export)
    writer = FeatureBagWriter(out, captions=cfg.caption, custom_data=custom_data(plan, model_name))
    guard = OutputGuard(out, "qvl-ros merge")
    guard.start()
    exporter = None
    counts = {"shards": len(plan.shards), "messages": 0, "sets": 0}
    closed = False
    try:
        if export is not None:
            from ..ros.feature_msgs import check_kinds

            exporter = FeatureExporter(export, plan.options["camera_names"], list(cfg.topics), model_name,
                                       cfg.prompt, check_kinds(list(cfg.features)), cfg.caption,
                                       shard_bytes=int(cfg.shard_mb * (1 << 20)))
        for shard in plan.shards:
            for topic, t, raw in _bag_messages(root / shard.name):
                writer.write_raw(topic, t, raw)
                counts["messages"] += 1
            if exporter is not None:
                for camera_stamps, row, text in _export_rows(root / f"{shard.name}.export"):
                    exporter.add(camera_stamps, row, text)
            counts["sets"] += markers[shard.index]["sets"]
    finally:
        guard.release()
        try:
            writer.close()
            if exporter is not None:
                exporter.close()
            closed = True
        finally:
            if closed:
                guard.finish()
    counts["export"] = export
    counts["devices"] = sorted({m.get("device_name", "?") for m in markers})
    return counts


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
