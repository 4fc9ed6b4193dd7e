"""Offline feature extraction: camera rosbag2 recordings in, a feature bag (and arrays) out.

    qvl-ros extract INPUT [INPUT ...] --out OUTPUT --topics /cam0/image_raw /cam1/image_raw ...
    python -m qvl_ros.offline.extract INPUT ... --out OUTPUT --topics ...

Reads the camera topics of one or more rosbag2 recordings (sqlite3 or mcap; several inputs are
merged in recording-time order), converts every frame with :mod:`qvl_ros.core.conversion`, matches
frames into synchronized sets with :class:`qvl_ros.core.synchronizer.Synchronizer` (the node's own
components), runs the model on ``--batch`` sets at a time and writes OUTPUT, an mcap rosbag2 with
one ``/qvl/features`` (qvl_ros/msg/VisionFeatures) message per set and, with ``--caption``, one
``/qvl/caption`` (qvl_ros/msg/Caption) message per set, and with ``--detect CLASSES`` (or
``--detect-query TEXT``) per set and camera one ``/qvl/<camera>/detections``
(vision_msgs/msg/Detection2DArray, the camera's input header; ``model.detect``, constrained). A message's recording time is the set's
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

The command's parts: :mod:`qvl_ros.offline.options` (the options and their checks),
:mod:`qvl_ros.offline.set_source` (recordings to synchronized sets), :mod:`qvl_ros.offline.engine`
(one run), :mod:`qvl_ros.offline.console` (progress, summary, signals); this module is the command
line and re-exports their public names.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from ..core.params import BY_NAME as P
from ..core.params import ParamError, read_params_file
from .console import Progress, StopOnSignal, format_summary  # noqa: F401  (public names of this command)
from .engine import CameraReport, ExtractReport, extract  # noqa: F401
from .options import (DEFAULT_PROMPT, EXIT_EMPTY, EXIT_FAILED, EXIT_OK, EXIT_SIGNAL, EXIT_USAGE,  # noqa: F401
                      FROM_FILE, PARAM_OF, ExtractConfig, ExtractError, check_number, intake_settings,
                      parse_classes)
from .set_source import FLUSH_BIRTH, SetSource, batch_window_index  # noqa: F401

__all__ = ["ExtractConfig", "ExtractReport", "CameraReport", "ExtractError", "extract", "add_arguments", "run_cli",
           "main", "format_summary", "config_from_args", "build_parser", "Progress", "StopOnSignal", "DEFAULT_PROMPT",
           "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_EMPTY", "EXIT_SIGNAL", "PARAM_OF", "FROM_FILE",
           "check_number", "intake_settings", "SetSource", "FLUSH_BIRTH", "batch_window_index"]

# (option, ExtractConfig field, argparse keywords): options whose default and rule are a node
# parameter's (PARAM_OF) or that a parameter file can give (topics, names, model, device)
TABLE_OPTIONS = [
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
    for option, field_name, kw in TABLE_OPTIONS:
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
    parser.add_argument("--detect", default=None, metavar="CLASSES",
                        help="also detect these objects (comma-separated class names, e.g. 'cup,chair,red door') "
                             "in every camera of every set: vision_msgs/Detection2DArray on /qvl/<camera>/detections "
                             "(with the camera's input header) and arrays in the export; constrained decoding "
                             "(llguidance), vision_msgs installed")
    parser.add_argument("--detect-query", default=None, metavar="TEXT",
                        help="as --detect, with one free-text request instead of class names "
                             "(e.g. 'the mug left of the laptop')")
    parser.add_argument("--detect-max", type=int, default=10, metavar="N",
                        help="most detections per camera and set (1-100, default 10)")
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
    for _, field_name, _ in TABLE_OPTIONS:
        given = getattr(args, field_name)
        name = FROM_FILE.get(field_name)
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
        announce_model_load=args.progress != "none", batch_window=args.batch_window,
        detect_classes=parse_classes(args.detect) if args.detect is not None else None,
        detect_query=args.detect_query, detect_max=args.detect_max, **cfg)


def run_cli(args: argparse.Namespace, prog: str = "qvl-ros extract") -> int:
    """Run from parsed arguments; print progress and the summary on stderr; return the exit code."""
    fleet = None
    try:
        check_number(args.progress_interval, "progress-interval", maximum=1e6)
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


