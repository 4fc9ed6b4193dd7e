"""The options of an extraction run (:class:`ExtractConfig`), their checks, and what they mean
for the intake and the output's metadata. Options with a node parameter of the same meaning take
its default and rule from the parameter table (:mod:`qvl_ros.core.params`; ``PARAM_OF``)."""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Sequence

from ..core.params import BY_NAME as P
from ..core.params import ParamError
from ..core.params import slop_ns as resolve_slop_ns

__all__ = ["ExtractConfig", "ExtractError", "DEFAULT_PROMPT", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_EMPTY",
           "EXIT_SIGNAL", "PARAM_OF", "FROM_FILE", "parse_time", "intake_settings", "custom_data", "check_number",
           "check_param_option", "check_options", "check_detect", "parse_classes"]

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
    # Detections (`model.detect`, constrained) per set and camera, written as
    # vision_msgs/Detection2DArray on /qvl/<camera>/detections and into the export: class names
    # or one free-text query (not both), at most detect_max detections per camera.
    detect_classes: Sequence[str] | None = None
    detect_query: str | None = None
    detect_max: int = 10

    @property
    def detect(self):
        """What detections ask for: the class list, the query, or None (no detections)."""
        if self.detect_classes:
            return list(self.detect_classes)
        return self.detect_query or None


def parse_time(spec: str | float | None, bag_start_ns: int, what: str) -> int | None:
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
        **detect_custom_data(cfg),
    }


def detect_custom_data(cfg: ExtractConfig) -> dict[str, str]:
    """The metadata of a run with detections (none without)."""
    if cfg.detect is None:
        return {}
    what = {"qvl_ros.detect_classes": ",".join(cfg.detect)} if isinstance(cfg.detect, list) else \
        {"qvl_ros.detect_query": cfg.detect}
    return {**what, "qvl_ros.detect_max": str(int(cfg.detect_max))}


def check_number(value, what: str, *, minimum: float = 0.0, strict: bool = False, maximum: float = 1e9,
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
FROM_FILE = {**PARAM_OF, "model": "model.path", "device": "model.device", "stamps": "sync.stamp_source"}


def check_param_option(value, field_name: str) -> None:
    """An option with a node parameter: that parameter's rule, in the option's words."""
    param = P[PARAM_OF[field_name]]
    what = field_name.replace("_", "-")
    if value is None:
        return
    if param.type in ("integer", "double") and value not in param.special:
        check_number(value, what, minimum=param.low, strict=param.low_open, maximum=param.high,
                      integer=param.type == "integer")
    try:
        param.check(list(value) if param.type in ("strings", "doubles") else value)
    except ParamError as exc:
        raise ExtractError(f"--{what}: {exc}") from None


def check_options(cfg: ExtractConfig) -> None:
    """Every numeric and choice option, so that nothing overflows or fails after the model loaded."""
    for field_name in PARAM_OF:
        check_param_option(getattr(cfg, field_name), field_name)
    checks = [
        (cfg.shard_mb, "shard-mb", dict(strict=True, maximum=1 << 20)),
        (cfg.batch_window, "batch-window", dict(maximum=1e6)),
        (cfg.prefetch, "prefetch", dict(integer=True, maximum=1024)),
    ]
    for value, what, kw in checks:
        check_number(value, what, **kw)
    if cfg.stamps not in ("header", "bag", "arrival", "auto"):
        raise ExtractError("--stamps must be header, bag (= arrival: the recording time) or auto")
    check_detect(cfg)


def parse_classes(text: str) -> list[str]:
    """`--detect cup,chair,red door`: the class names, stripped (checked by :func:`check_detect`)."""
    return [c.strip() for c in str(text).split(",")]


def _name_problem(name, what: str, longest: int) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return f"{what} is empty"
    if len(name) > longest:
        return f"{what} {name[:20]!r}... has {len(name)} characters (at most {longest})"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{what} {name!r} holds a control character"
    if "<|" in name or "|>" in name:
        return f"{what} {name!r} holds '<|' or '|>' (the model's special-token markers)"
    return None


def check_detect(cfg: ExtractConfig) -> None:
    """--detect / --detect-query / --detect-max: the library's bounds (class count, name length,
    detections per camera), in the options' words. Imports the grounding module (torch) only when
    detections are asked for."""
    if cfg.detect_classes is None and cfg.detect_query is None:
        return
    from ..model.grounding import MAX_CLASSES, MAX_DETECTIONS, MAX_NAME_CHARS

    if cfg.detect_classes is not None and cfg.detect_query is not None:
        raise ExtractError("give --detect CLASSES or --detect-query TEXT, not both")
    if cfg.detect_classes is not None:
        classes = list(cfg.detect_classes)
        if not classes:
            raise ExtractError("--detect needs at least one class name")
        if len(classes) > MAX_CLASSES:
            raise ExtractError(f"--detect: {len(classes)} class names; at most {MAX_CLASSES}")
        for c in classes:
            problem = _name_problem(c, "a class name", MAX_NAME_CHARS)
            if problem:
                raise ExtractError(f"--detect: {problem}")
        if any(c != c.strip() for c in classes):
            raise ExtractError("--detect: class names must not start or end with spaces")
        if len(set(classes)) != len(classes):
            raise ExtractError(f"--detect: a class name is given twice: {classes}")
    else:
        problem = _name_problem(cfg.detect_query, "the query", MAX_NAME_CHARS)
        if problem:
            raise ExtractError(f"--detect-query: {problem}")
    check_number(cfg.detect_max, "detect-max", minimum=1, maximum=MAX_DETECTIONS, integer=True)
