"""The parameter table: every setting of the pipeline, written once.

Each :class:`Param` row gives the node parameter's name, type, default, range, whether it is
read-only (fixed for the node's life) and its description; the extraction option of the same
meaning, where there is one. The table drives

* the node's declarations (descriptors with ranges, read-only flags, descriptions) and every
  check of a value, at start-up and on a change (:mod:`qvl_ros.ros.params`);
* the extraction command's options and their defaults, and its ``--params-file`` (the node's
  parameter file, read with :func:`read_params_file`): live and offline runs share one
  configuration, and without a file both use these defaults;
* the documentation of ``config/multi_cam.yaml`` (test/test_params.py checks the file against
  the table, and :func:`documented_yaml` writes the file's text from it).

Pure Python (yaml only to read a parameter file).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from .synchronizer import default_slop_ns

__all__ = ["Param", "PARAMS", "BY_NAME", "AUTO_SLOP", "ASSUMED_RATE_HZ", "check_value", "check_values",
           "defaults", "read_params_file", "documented_yaml", "slop_ns", "ParamError", "detect_problem"]

AUTO_SLOP = -1.0        # sync.slop: derived from the expected frame rates
ASSUMED_RATE_HZ = 10.0  # the slowest camera rate assumed when no expected rate is set
NODE_NAME = "qvl_node"


class ParamError(ValueError):
    """A value outside its parameter's type, range or choices; the text names the parameter."""


@dataclass(frozen=True)
class Param:
    """One parameter. ``type``: string | strings | integer | double | doubles | bool. ``low`` /
    ``high``: the range (``low_open``: strictly above ``low``); ``special``: values allowed
    outside it (``sync.slop`` -1); ``choices``: the allowed strings (for ``strings``: a non-empty
    subset); ``option``: the extraction option of the same meaning; ``max_length``: the longest
    string (each of a list), ``max_items``: the longest list (a parameter is something another
    process can send: every value is bounded)."""

    name: str
    type: str
    default: Any
    description: str
    read_only: bool = True
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    special: Tuple[Any, ...] = ()
    choices: Tuple[str, ...] = ()
    option: Optional[str] = None
    max_length: int = 4096   # characters of a string (each string of a list)
    max_items: int = 256     # entries of a list

    @property
    def constraints(self) -> str:
        """The rule in words (the descriptor's ``additional_constraints``)."""
        if self.choices:
            return (" | ".join(self.choices) if self.type == "string"
                    else f"non-empty subset of [{', '.join(self.choices)}]")
        if self.low is None:
            return "each >= 0" if self.type == "doubles" else ""
        bound = f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None and self.high <= 1.0 and self.low == 0 and not self.low_open:
            bound = "0..1"
        return " or ".join([f"{v:g}" for v in self.special] + [bound])

    @property
    def bounds(self) -> Optional[Tuple[float, float]]:
        """The descriptor's range (rclpy refuses values outside it): the range with the special values."""
        if self.low is None or self.high is None:
            return None
        low = min([self.low, *self.special])
        if self.low_open:  # (low, high]: the smallest value a descriptor can express
            low = self.low + (1 if self.type == "integer" else 0.001)
        return low, self.high

    def check(self, value: Any) -> Any:
        """The value if it is of this parameter's type and within its rules; ParamError otherwise."""
        kind = {"string": str, "strings": list, "integer": int, "double": (int, float), "doubles": list,
                "bool": bool}[self.type]
        if self.type in ("strings", "doubles") and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
            value = list(value)  # a tuple, or rclpy's array.array of doubles
        if not isinstance(value, kind) or (isinstance(value, bool) and self.type not in ("bool",)):
            raise ParamError(f"parameter {self.name} must be of type {self.type}, got {_short(value)}")
        self._check_size(value)
        if self.type == "strings":
            if not all(isinstance(v, str) for v in value):
                raise ParamError(f"parameter {self.name} must be a list of strings, got {value!r}")
            if self.choices and (not value or any(v not in self.choices for v in value)):
                raise ParamError(f"parameter {self.name} must be a {self.constraints}, got {value!r}")
        elif self.type == "doubles":
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                       for v in value):
                raise ParamError(f"parameter {self.name} must be numbers >= 0, got {value!r}")
        elif self.type == "string" and self.choices and value not in self.choices:
            raise ParamError(f"parameter {self.name} must be {' or '.join(self.choices)}, got {value!r}")
        elif self.type in ("integer", "double"):
            self._check_number(value)
        return value

    def _check_size(self, value: Any) -> None:
        if self.type in ("strings", "doubles") and len(value) > self.max_items:
            raise ParamError(f"parameter {self.name} has {len(value)} entries, more than {self.max_items}")
        strings = [value] if self.type == "string" else value if self.type == "strings" else []
        for v in strings:
            if isinstance(v, str) and len(v) > self.max_length:
                raise ParamError(f"parameter {self.name}: a string of {len(v)} characters is longer than "
                                 f"{self.max_length}")

    def _check_number(self, value: Any) -> None:
        if value in self.special:
            return
        ok = math.isfinite(value) and (self.low is None or (value > self.low if self.low_open else value >= self.low))
        ok = ok and (self.high is None or value <= self.high)
        if not ok:
            top = f" and <= {self.high:g}" if self.high is not None else ""
            raise ParamError(f"parameter {self.name} must be {self.constraints}{top}, got {value!r}")


_R = 3600.0  # seconds: the top of most time ranges
# model.grounding's bounds (MAX_CLASSES, MAX_NAME_CHARS, MAX_DETECTIONS; test_params compares them)
DETECT_MAX_CLASSES, DETECT_MAX_NAME, DETECT_MAX_DETECTIONS = 64, 128, 100
PARAMS: Tuple[Param, ...] = (
    Param("camera_topics", "strings", ["camera_0/image_raw", "camera_1/image_raw", "camera_2/image_raw"],
          "Camera topics (sensor_msgs/Image; CompressedImage if the name ends in /compressed), in set order.",
          option="--topics"),
    Param("camera_names", "strings", [],
          "Camera names used in messages and diagnostics, parallel to camera_topics (default: from the topics).",
          option="--names"),
    Param("compressed", "bool", False, "Subscribe to every camera as sensor_msgs/CompressedImage."),
    Param("sync.slop", "double", AUTO_SLOP,
          "Largest stamp spread within one synchronized set (s); -1 = a third of the slowest expected frame "
          "period (diagnostics.expected_rates; 10 Hz where none is set).", low=0.0, high=10.0,
          special=(AUTO_SLOP,), option="--slop"),
    Param("sync.queue_size", "integer", 10, "Frames kept per camera while waiting for a set.", low=1, high=1000,
          option="--queue-size"),
    Param("sync.policy", "string", "approximate_time",
          "Set choice: approximate_time (message_filters' ApproximateTime: tightest sets) or max_sets "
          "(earliest in-slop set: the most sets).", choices=("approximate_time", "max_sets"), option="--policy"),
    Param("sync.reorder_tolerance", "double", 0.0,
          "How far back (s) a camera's stamps may arrive out of order; 0 = in order.", low=0.0, high=10.0,
          option="--reorder"),
    Param("sync.stamp_source", "string", "header",
          "Frame time: header stamp, arrival time, or auto (header stamp, arrival time when it is zero). "
          "Offline the arrival time is the recording time.", choices=("header", "arrival", "auto"),
          option="--stamps"),
    Param("sync.reset_threshold", "double", 1.0,
          "A camera stamp going back by more than this (s) resets the synchronizer (bag loop).", low=0.0,
          high=_R, low_open=True, option="--reset-threshold"),
    Param("video.frames", "integer", 0,
          "0: still images; K >= 2: each camera's clip of K frames ending at its matched frame.", low=2, high=64,
          special=(0,), option="--clip-frames"),
    Param("video.stride", "integer", 1, "Clips take every s-th frame of their camera.", low=1, high=100,
          option="--clip-stride"),
    Param("batch.max_size", "integer", 4, "Most synchronized sets per model call.", read_only=False, low=1,
          high=256, option="--batch"),
    Param("batch.max_wait_ms", "double", 10.0, "How long the oldest waiting set may wait for a batch to fill (ms).",
          read_only=False, low=0.0, high=10000.0),
    Param("batch.queue_depth", "integer", 8, "Sets waiting for the model; when full the oldest is dropped.",
          low=1, high=1024),
    Param("max_rate", "double", 0.0, "Most sets per second given to the model (node clock; offline: recording "
          "time); the rest are dropped and counted. 0 = no cap.", read_only=False, low=0.0, high=1000.0,
          option="--max-rate"),
    Param("lazy", "bool", False, "Subscribe to the cameras only while features or caption has a subscriber."),
    Param("ask.queue_depth", "integer", 4, "Questions (~/ask service and action, ~/detect action) that may wait "
          "for the model; more are refused.",
          low=1, high=64),
    Param("ask.max_new_tokens", "integer", 512,
          "Longest ~/ask answer in tokens; a request asking for more is refused (0 in a request: "
          "caption.max_new_tokens, capped at this).", read_only=False, low=1, high=65536),
    Param("ask.max_prompt_chars", "integer", 4096,
          "Longest ~/ask prompt in characters (Unicode code points); a longer one is refused.", read_only=False,
          low=1, high=65536),
    Param("ask.request_depth", "integer", 100,
          "History depth of the ~/ask service's request queue and of the actions' goal requests (not yet "
          "taken by the node); "
          "at least ask.queue_depth, so that a burst is answered (busy beyond the queue) instead of dropped.",
          low=1, high=10000),
    Param("model.path", "string", "",
          "Checkpoint directory or cached Hugging Face id; empty = the bundled tiny model (created on first use).",
          option="--model"),
    Param("model.device", "string", "auto", "auto | cpu | cuda | cuda:K", option="--device"),
    Param("model.dtype", "string", "auto", "auto | float32 | bfloat16 | float16 (auto: float32 on CPU)",
          choices=("auto", "float32", "bfloat16", "float16"), option="--dtype"),
    Param("model.min_pixels", "integer", 0, "Resize lower bound in pixels per image; 0 = the checkpoint's.",
          low=0, high=1 << 30, option="--min-pixels"),
    Param("model.max_pixels", "integer", 0, "Resize upper bound in pixels per image; 0 = the checkpoint's.",
          low=0, high=1 << 30, option="--max-pixels"),
    Param("model.warmup", "bool", True, "Run the model on black frames when configuring (BatchedQwenVL.warmup: "
          "on CUDA it captures the decode graphs and compiles the vision blocks for model.warmup_size)."),
    Param("model.warmup_size", "string", "224x224",
          "Frame sizes the cameras deliver, for the warm-up: HxW for all, HxW,HxW,... per camera, or empty: "
          "the first set's frames (warmed up in the worker before that set)."),
    Param("prompt", "string", "Describe the scene.", "Text given to the model with the images of each set.",
          read_only=False, option="--prompt"),
    Param("features", "strings", ["vision", "hidden"], "Tensors to publish: vision (per camera), hidden (decoder).",
          read_only=False, choices=("vision", "hidden"), option="--features"),
    Param("frame_id", "string", "", "header.frame_id of the output messages.", read_only=False,
          option="--frame-id"),
    Param("caption.enabled", "bool", False, "Also generate and publish a caption per set.", read_only=False,
          option="--caption"),
    Param("caption.max_new_tokens", "integer", 32, "Longest caption (and default ~/ask answer) in tokens.",
          read_only=False, low=1, high=4096, option="--max-new-tokens"),
    Param("detect.enabled", "bool", False,
          "Also detect objects in every set: a vision_msgs/Detection2DArray per camera on <camera name>/detections "
          "(needs detect.classes or detect.query, and vision_msgs installed).", read_only=False),
    Param("detect.classes", "strings", [], "Class names to detect (empty: detect.query).", read_only=False,
          max_items=DETECT_MAX_CLASSES, max_length=DETECT_MAX_NAME),
    Param("detect.query", "string", "", "Free-text description of what to detect, used when detect.classes is empty.",
          read_only=False, max_length=DETECT_MAX_NAME),
    Param("detect.max_detections", "integer", 10, "Most detections per camera and set.", read_only=False, low=1,
          high=DETECT_MAX_DETECTIONS),
    Param("detect.min_detections", "integer", 0,
          "Fewest detections per camera the answer grammar allows; 0 = the model decides (above 0 forces boxes: "
          "tests and demos).", read_only=False, low=0, high=DETECT_MAX_DETECTIONS),
    Param("detect.annotated_image", "bool", False,
          "Also publish each camera's frame with its detections drawn (sensor_msgs/Image rgb8) on "
          "<camera name>/detections/image."),
    Param("qos.reliability", "string", "best_effort", "Reliability of the camera subscriptions.",
          choices=("best_effort", "reliable")),
    Param("qos.depth", "integer", 5, "History depth of the camera subscriptions.", low=1, high=1000),
    Param("diagnostics.period", "double", 1.0, "Period of /diagnostics (s).", low=0.0, high=_R, low_open=True),
    Param("diagnostics.stale_after", "double", 2.0, "A camera without a valid frame for this long is stale (s).",
          read_only=False, low=0.0, high=_R, low_open=True),
    Param("diagnostics.hardware_id", "string", "",
          "hardware_id of the pipeline status; empty = the model device (e.g. cuda:0 NVIDIA H200)."),
    Param("diagnostics.expected_rates", "doubles", [0.0],
          "Expected frame rate per camera (Hz), one value for all or one per camera; 0 = not checked. "
          "They set the default sync.slop (offline too)."),
    Param("diagnostics.rate_tolerance", "double", 0.1,
          "Relative tolerance of the expected rates (FrequencyStatus' tolerance).", low=0.0, high=1.0),
    Param("diagnostics.window", "double", 5.0, "Window of the rates and of the drop check (s).", low=0.1,
          high=600.0),
    Param("diagnostics.no_set_after", "double", 3.0,
          "ERROR when every camera delivers but no set was made for this long (s).", low=0.0, high=_R,
          low_open=True),
    Param("diagnostics.drop_warn_fraction", "double", 0.2,
          "WARN when more than this fraction of frames or sets was dropped over the window.", low=0.0, high=1.0),
    Param("max_input_pixels", "integer", 4096 * 4096,
          "Largest height x width a frame may declare (checked from the header before decoding); larger frames "
          "are dropped as too_large. 0 = no limit.", low=0, high=1 << 40, option="--max-input-pixels"),
    Param("log_throttle", "double", 5.0, "At most one log line per camera and error kind per this period (s).",
          low=0.0, high=_R),
)
BY_NAME: Dict[str, Param] = {p.name: p for p in PARAMS}


def _short(value: Any) -> str:
    """A value in an error message, at most 200 characters of it."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"


def defaults() -> Dict[str, Any]:
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in PARAMS}


def check_value(name: str, value: Any) -> Any:
    """``value`` checked against parameter ``name``'s rules (ParamError for an unknown name too)."""
    if name not in BY_NAME:
        raise ParamError(f"unknown parameter {name!r}")
    return BY_NAME[name].check(value)


def check_values(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Every value checked; then the rules between parameters (names per topic, unique)."""
    out = {name: check_value(name, value) for name, value in values.items()}
    topics, names = out.get("camera_topics"), out.get("camera_names")
    if topics is not None and not topics:
        raise ParamError("camera_topics must name at least one topic")
    if topics is not None and names:
        if len(names) != len(topics):
            raise ParamError(f"camera_names has {len(names)} entries for {len(topics)} camera_topics")
        if len(set(names)) != len(names):
            raise ParamError(f"camera_names must be unique, got {names}")
    problem = detect_problem(out)
    if problem:
        raise ParamError(problem)
    return out


def detect_problem(values: Mapping[str, Any]) -> Optional[str]:
    """The rules between the detect.* parameters (the values given; the others' defaults): what
    to detect when enabled, fewest detections at most the most; None when they hold."""
    v = {**{k: p.default for k, p in BY_NAME.items() if k.startswith("detect.")}, **values}
    if v["detect.enabled"] and not [c for c in v["detect.classes"] if str(c).strip()] and not str(v["detect.query"]).strip():
        return "detect.enabled needs detect.classes or detect.query"
    if any(not str(c).strip() for c in v["detect.classes"]):
        return "detect.classes must not hold an empty name"
    if int(v["detect.min_detections"]) > int(v["detect.max_detections"]):
        return (f"detect.min_detections ({v['detect.min_detections']}) is above detect.max_detections "
                f"({v['detect.max_detections']})")
    return None


def slop_ns(slop_s: float, expected_rates: Iterable[float]) -> int:
    """sync.slop in ns; -1 (the default) derives it from the cameras' expected rates."""
    if float(slop_s) == AUTO_SLOP:
        known = [float(r) for r in expected_rates if float(r) > 0]
        return default_slop_ns([min(known)] if known else [ASSUMED_RATE_HZ])
    return int(round(float(slop_s) * 1e9))


def read_params_file(path: str, node_name: str = NODE_NAME) -> Dict[str, Any]:
    """The parameters a ROS 2 parameter file gives the node ``node_name`` (section ``/**``, then
    every section whose last name element is ``node_name``: ``qvl_node``, ``/**/qvl_node``, ...;
    later ones winning), flattened to dotted names and checked against the table (ParamError
    names the file and the key)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamError(f"{path}: not a parameter file (a mapping of node names)")
    values: Dict[str, Any] = {}
    sections = [k for k in data if str(k) == "/**"] + [k for k in data if str(k).split("/")[-1] == node_name]
    for section in sections:
        params = data[section].get("ros__parameters") if isinstance(data[section], dict) else None
        if isinstance(params, dict):
            values.update(_flatten(params))
    if not sections:
        raise ParamError(f"{path}: no section for {node_name} (/**, {node_name}, /**/{node_name}, ...)")
    try:
        return check_values(values)
    except ParamError as exc:
        raise ParamError(f"{path}: {exc}") from None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def documented_yaml(values: Optional[Mapping[str, Any]] = None, node_name: str = NODE_NAME) -> str:
    """A parameter file for the node with every parameter (``values`` over the defaults), each
    under a comment with its description and rule: the documentation the table gives."""
    import json

    merged = {**defaults(), **(values or {})}
    lines = [f"{node_name}:", "  ros__parameters:"]
    for p in PARAMS:
        rule = f" [{p.constraints}]" if p.constraints else ""
        lines.append(f"    # {p.description}{rule}{'' if p.read_only else ' (changeable at run time)'}")
        lines.append(f"    {p.name}: {json.dumps(merged[p.name])}")
    return "\n".join(lines) + "\n"
