"""ROS 2 node ``qvl_node``: synchronized multi-camera frames -> batched Qwen-VL -> features/captions.

    python -m qvl_ros.ros.node --ros-args --params-file config/multi_cam.yaml
    ros2 run qvl_ros qvl_node --ros-args -p camera_topics:="[front/image_raw, left/image_raw]"

Data flow (the logic lives in the components; this module wires them to ROS):

* one subscription per camera (``sensor_msgs/Image``, or ``CompressedImage`` for topics ending
  in ``/compressed`` or with ``compressed: true``), sensor-data QoS; each camera has its own
  mutually exclusive callback group, so its frames stay in order on any executor;
* the callback converts the message to a uint8 ``(3, H, W)`` tensor on the model device
  (:mod:`qvl_ros.core.conversion`) and adds it to the :class:`~qvl_ros.core.synchronizer.Synchronizer`
  under the node's lock; complete sets go to the :class:`~qvl_ros.core.batcher.Batcher`. Invalid
  frames are dropped, counted and logged (throttled per topic and reason);
* the batcher's worker thread runs ``encode`` (or ``encode_generate`` when captions are on) on
  up to ``batch.max_size`` sets and publishes one ``VisionFeatures`` (and one ``Caption``) per
  set on ``features`` / ``caption`` (relative to the node namespace), stamps copied from the
  cameras' frames. A failing batch is retried set by set; a set that still fails is logged
  with its stamps and dropped; the node keeps serving;
* a steady-clock timer publishes ``/diagnostics`` (see :mod:`qvl_ros.core.diagnostics`).

Executor: ``main`` spins the node on a ``SingleThreadedExecutor``; callbacks only convert and
enqueue, and the model has its own thread. Prefer that when embedding the node too: rclpy's
``MultiThreadedExecutor`` polls without blocking while a mutually exclusive callback is running
and a new message waits, and that loop holds the GIL so much that the model thread crawls
(measured here: batches of 12 ms took up to 10 s, camera callbacks stalled for seconds).

Clips (``video.frames`` K >= 2): each camera also keeps a ring of its recent frames
(:mod:`qvl_ros.core.clips`); a synchronized set carries, per camera, the clip of K frames (every
``video.stride``-th) ending at its matched frame, its frame rate taken from the frames' stamps,
and the features message lists the clip stamps. Restarts of a ring and sets before every camera
holds a full clip are counted in ``/diagnostics``.

Parameters are declared with descriptors in ``QvlNode.__init__``; ``config/multi_cam.yaml``
documents every one. Those that need a restart (topics, QoS, synchronizer, queue depth, model)
are read-only; ``prompt``, ``features``, ``frame_id``, ``caption.*``, ``batch.max_size``,
``batch.max_wait_ms`` and ``diagnostics.stale_after`` can be changed at run time.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import threading
import time
from typing import Any, List, Optional, Sequence, Tuple

import rclpy
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockChange, ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.exceptions import InvalidParameterValueException
from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from ..core.batcher import Batcher
from ..core.clips import ClipAssembler
from ..core.conversion import DEFAULT_MAX_INPUT_PIXELS, msg_to_tensor
from ..core.input_loss import InputLossEstimator
from ..core.diagnostics import ERROR, LogThrottle, PipelineMonitor, expected_rates, reason_key
from ..core.rate_limit import RateLimiter
from ..core.stamps import stamp_ns
from .ask import AskServer
from .diagnostic_array import to_diagnostic_array
from .spin import interruptible
from .feature_msgs import (Frame, MessageKit, caption_fields, check_kinds, features_fields, hidden_rows_of,
                           placeholder_token_ids, sample_tensors, set_info, with_clips)
from .tensor_msg import from_tensor
from ..model.checkpoint import resolve_checkpoint
from ..model.model import DTYPES
from ..model.processor import MIN_SIDE, image_size_problem
from ..core.synchronizer import SyncSet, Synchronizer, default_slop_ns
from ..core.topics import camera_names as default_camera_names
from ..core.warmup import batch_sizes as warmup_batch_sizes
from ..core.warmup import frame_sizes as warmup_frame_sizes
from ..core.warmup import parse_sizes as parse_warmup_sizes

__all__ = ["QvlNode", "QvlLifecycleNode", "QvlPipeline", "main", "default_camera_names"]

NODE_NAME = "qvl_node"
LAZY_CHECK_PERIOD = 0.2  # s between two looks at the subscriber count with lazy=true
AUTO_SLOP = -1.0         # sync.slop default: derived from the expected frame rates
ASSUMED_RATE_HZ = 10.0   # the slowest camera rate assumed when no expected rate is set

_STRING, _STRINGS = ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_STRING_ARRAY
_INT, _DOUBLE, _BOOL = ParameterType.PARAMETER_INTEGER, ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_BOOL
_DOUBLES = ParameterType.PARAMETER_DOUBLE_ARRAY


def _stamps_text(stamps_ns: Sequence[int]) -> str:
    return "[" + ", ".join(f"{s // 1_000_000_000}.{s % 1_000_000_000:09d}" for s in stamps_ns) + "]"


def describe_device(device: Any) -> str:
    """``cpu`` or ``cuda:0 NVIDIA H200``: the default hardware_id of the pipeline status."""
    text = str(device)
    if text.startswith("cuda"):
        import torch

        try:
            return f"{text} {torch.cuda.get_device_name(device)}"
        except Exception:
            return text
    return text


def release_device_memory(device: Any) -> None:
    """Return cached GPU memory to the driver once the model is gone (lifecycle cleanup). On the
    CPU there is no cache to return: no full collection there (it took tens of seconds on a
    loaded machine, on the way out after a signal)."""
    if str(device).startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


class QvlPipeline:
    """The pipeline of ``qvl_node``, shared by :class:`QvlNode` (plain) and
    :class:`QvlLifecycleNode` (managed). Mixed into an rclpy node class; its steps:

    * :meth:`_read_config` (construction): declare and check the parameters;
    * :meth:`_configure`: load the model and warm it up, make the synchronizer, batcher and
      monitor, the publishers, ``~/ask`` and the diagnostics timer;
    * :meth:`_activate`: subscribe to the cameras (with ``lazy``: whenever someone listens);
    * :meth:`_deactivate`: unsubscribe, drop the queued sets, let the batch in flight finish;
    * :meth:`_cleanup`: stop the worker, destroy the interfaces and free the model.
    """

    _configured = False
    _active = False
    model: Any = None

    # ------------------------------------------------------------------------- set-up steps
    def _read_config(self) -> None:
        """Declare the parameters and check the settings that are fixed for the node's life."""
        self._declare_parameters()
        v = self._value
        self._topics = [str(t) for t in v("camera_topics")]
        if not self._topics:
            raise ValueError("camera_topics must name at least one topic")
        self._names = [str(n) for n in v("camera_names")]
        if len(self._names) != len(self._topics):
            raise ValueError(f"camera_names has {len(self._names)} entries for {len(self._topics)} camera_topics")
        if len(set(self._names)) != len(self._names):
            raise ValueError(f"camera_names must be unique, got {self._names}")
        check_kinds(list(v("features")))
        self._stamp_source = str(v("sync.stamp_source"))
        if self._stamp_source not in ("header", "arrival", "auto"):
            raise ValueError(f"sync.stamp_source must be header, arrival or auto, got {self._stamp_source!r}")
        if str(v("sync.policy")) not in ("approximate_time", "max_sets"):
            raise ValueError(f"sync.policy must be approximate_time or max_sets, got {v('sync.policy')!r}")
        reliability = str(v("qos.reliability")).lower()
        if reliability not in ("best_effort", "reliable"):
            raise ValueError(f"qos.reliability must be best_effort or reliable, got {reliability!r}")
        self._camera_qos = QoSProfile(
            history=qos_profile_sensor_data.history, depth=int(v("qos.depth")),
            reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE),
            durability=qos_profile_sensor_data.durability)
        self._expected_rates = expected_rates(list(v("diagnostics.expected_rates")), len(self._topics))
        self._resolved_topics = [self.resolve_topic_name(t) for t in self._topics]
        self._subs: List[Any] = []
        self._add_parameter_callbacks()

    def _configure(self, model: Any = None) -> None:
        """Model, pipeline components and outputs; the node then waits for :meth:`_activate`.
        A signal abandons the model load and the warm-up at once (spin.interruptible)."""
        with interruptible():
            self.model = model if model is not None else self._load_model()
            self._model_name = str(getattr(self.model, "name", "") or self._value("model.path"))
            self._device = self.model.device
            self._geometry: dict = {}  # (height, width, frames) -> Geometry, for the messages' inputs
            self._placeholder_ids = placeholder_token_ids(self.model)
            if self._value("model.warmup"):
                self._warm_up()
        self._create_components()
        self._create_outputs()
        self._configured = True

    def _slop_ns(self) -> int:
        """sync.slop in ns; the default (-1) derives it from the cameras' expected rates."""
        slop = float(self._value("sync.slop"))
        if slop == AUTO_SLOP:
            known = [r for r in self._expected_rates if r > 0]
            return default_slop_ns([min(known)] if known else [ASSUMED_RATE_HZ])
        return int(round(slop * 1e9))

    def _create_components(self) -> None:
        v = self._value
        self._lock = threading.Lock()  # synchronizer add + batcher put, in one order
        self._sync = Synchronizer(len(self._topics), self._slop_ns(), int(v("sync.queue_size")),
                                  **self._sync_options())
        # clips: per camera a ring of its recent frames; a set's frames become the clips ending at them
        self._clips = (ClipAssembler(len(self._topics), int(v("video.frames")), int(v("video.stride")),
                                     lag=int(v("sync.queue_size"))) if int(v("video.frames")) else None)
        self._batcher: Batcher[SyncSet] = Batcher(
            self._run_batch, max_size=int(v("batch.max_size")), max_wait_ms=float(v("batch.max_wait_ms")),
            queue_depth=int(v("batch.queue_depth")), on_error=self._on_model_error, name="qvl_batch_worker",
            on_drop=lambda _set: self._monitor.sets_dropped("queue_full"),
            task_depth=int(v("ask.queue_depth")))
        self._log_throttle = LogThrottle(float(v("log_throttle")))
        self._max_input_pixels = int(v("max_input_pixels"))
        self._loss = InputLossEstimator(self._names)
        self._rate = RateLimiter(float(v("max_rate")))
        self._monitor = PipelineMonitor(self._names, self._resolved_topics, **self._monitor_options())
        self._monitor.set_paused(True)  # until the cameras are subscribed
        self._latest: Optional[SyncSet] = None  # newest set the synchronizer made (for ~/ask)
        self._epoch = 0  # bumped when time jumps back: results of older sets are not published
        self._stale_reported: set = set()
        self._batcher.start()

    def _sync_options(self) -> dict:
        """Keyword options of the Synchronizer; ``policy`` only where the class takes it."""
        v = self._value
        options = {"reset_threshold": int(round(float(v("sync.reset_threshold")) * 1e9)),
                   "reorder_tolerance": int(round(float(v("sync.reorder_tolerance")) * 1e9))}
        if "policy" in inspect.signature(Synchronizer).parameters:
            options["policy"] = str(v("sync.policy"))
        return options

    def _monitor_options(self) -> dict:
        v = self._value
        return {"stale_after_s": float(v("diagnostics.stale_after")), "rate_window_s": float(v("diagnostics.window")),
                "expected_rates": self._expected_rates, "rate_tolerance": float(v("diagnostics.rate_tolerance")),
                "no_set_after_s": float(v("diagnostics.no_set_after")),
                "drop_warn_fraction": float(v("diagnostics.drop_warn_fraction"))}

    def _create_outputs(self) -> None:
        from qvl_ros.msg import Caption, VisionFeatures
        from diagnostic_msgs.msg import DiagnosticArray

        v = self._value
        self._kit = MessageKit()
        self._features_pub = self.create_publisher(VisionFeatures, "features", 10)
        self._caption_pub = self.create_publisher(Caption, "caption", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._demand_topics = [self._features_pub.topic_name, self._caption_pub.topic_name]
        self._ask = AskServer(
            self, latest=self._newest_set, submit=lambda task, cancel: self._batcher.submit(
                lambda: task(self.model), cancel),
            camera_names=self._names, default_tokens=lambda: int(self._value("caption.max_new_tokens")),
            why_no_set=self._why_no_set, queue_depth=int(v("ask.queue_depth")))
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_timer = self.create_timer(float(v("diagnostics.period")), self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup(), clock=self._steady)
        self._demand_timer = None
        self._hardware_id = str(v("diagnostics.hardware_id")) or describe_device(self._device)
        # A backward jump of ROS time (bag loop, simulation reset) or a switch of time source
        # makes queued stamps meaningless: start over.
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(seconds=-1), on_clock_change=True),
            post_callback=self._on_time_jump)

    def _activate(self) -> None:
        self._active = True
        if self._value("lazy"):
            self._demand_timer = self.create_timer(LAZY_CHECK_PERIOD, self._check_demand,
                                                   callback_group=MutuallyExclusiveCallbackGroup(), clock=self._steady)
            self._check_demand()
        else:
            self._subscribe()

    def _deactivate(self) -> None:
        """Stop taking frames, drop the queued sets (counted ``inactive``), wait for the batch
        in flight (its results are not published)."""
        self._active = False
        if self._demand_timer is not None:
            self.destroy_timer(self._demand_timer)
            self._demand_timer = None
        self._unsubscribe()
        with self._lock:
            self._latest = None
            dropped = self._batcher.clear("inactive")
        self._monitor.sets_dropped("inactive", dropped)
        self._batcher.wait_for(lambda s: s["running"] == 0, 60.0)

    def _cleanup(self) -> None:
        """Stop the worker (queued sets are discarded), destroy the outputs, free the model.
        Tolerates a partial configuration (a configure that failed half way)."""
        self._configured = False
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.stop(drain=False, timeout=30.0)
        if getattr(self, "_ask", None) is not None:
            self._ask.destroy()
            self._ask = None
        if getattr(self, "_diag_timer", None) is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        for name in ("_features_pub", "_caption_pub", "_diag_pub"):
            if getattr(self, name, None) is not None:
                self.destroy_publisher(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "_jump_handle", None) is not None:
            self._jump_handle.unregister()
            self._jump_handle = None
        device = getattr(self, "_device", None)
        self.model = None
        self._geometry = {}
        if device is not None:
            release_device_memory(device)

    def _log_ready(self) -> None:
        v = self._value
        cams = ", ".join(f"{n} <- {t}" for n, t in zip(self._names, self._resolved_topics))
        self.get_logger().info(
            f"ready: {len(self._topics)} cameras [{cams}]; model {self._model_name} on {self._device}; "
            f"publishing {self.resolve_topic_name('features')}"
            + (f" and {self.resolve_topic_name('caption')}" if v("caption.enabled") else "")
            + (" (lazy: cameras subscribed while someone listens)" if v("lazy") else ""))

    def _warm_up(self, sizes: Optional[List[tuple]] = None) -> None:
        """Pay the model's one-time costs (allocation, kernel choice; on CUDA graph capture and
        compilation) for the cameras' frame sizes and every decode batch bucket up to
        batch.max_size (core/warmup.py). model.warmup_size unset: deferred to the first set."""
        t0 = time.perf_counter()
        sizes = sizes or parse_warmup_sizes(self._value("model.warmup_size"), len(self._topics))
        self._warm_pending = sizes is None
        if sizes is None:
            self.get_logger().info("warm-up deferred: model.warmup_size is unset, the first set's frames decide")
            return
        tokens = int(self._value("caption.max_new_tokens")) if self._value("caption.enabled") else 0
        batches = warmup_batch_sizes(int(self._value("batch.max_size")))
        if hasattr(self.model, "warmup"):
            self.model.warmup(sizes, batch_sizes=batches, prompt=str(self._value("prompt")), max_new_tokens=tokens)
        else:  # a wrapped model (tests, instrumentation): one call on black frames
            import torch

            frames = [[torch.zeros(3, h, w, dtype=torch.uint8, device=self._device) for h, w in sizes]]
            self.model.encode(frames, [str(self._value("prompt"))])
        self.get_logger().info(f"warm-up for frames {', '.join(f'{h}x{w}' for h, w in sizes)}, batches {batches}: "
                               f"{time.perf_counter() - t0:.2f} s")

    # ------------------------------------------------------------------------- cameras
    def _subscribe(self) -> None:
        from sensor_msgs.msg import CompressedImage, Image

        if self._subs:
            return
        self._monitor.set_paused(False)
        compressed_all = bool(self._value("compressed"))
        for i, topic in enumerate(self._topics):
            is_compressed = compressed_all or topic.rstrip("/").split("/")[-1] == "compressed"
            msg_type = CompressedImage if is_compressed else Image
            self._subs.append(self._subscribe_camera(i, msg_type, topic, self._camera_qos))

    def _subscribe_camera(self, i: int, msg_type: Any, topic: str, qos: QoSProfile):
        """Camera subscription, with the middleware's message-lost events where it reports them."""
        group = MutuallyExclusiveCallbackGroup()
        events = SubscriptionEventCallbacks(
            message_lost=lambda info, i=i: self._loss.middleware_lost(i, info.total_count_change))
        try:
            sub = self.create_subscription(msg_type, topic, lambda msg, i=i: self._on_frame(i, msg), qos,
                                           callback_group=group, event_callbacks=events)
            self._loss.middleware_support(i, True)
        except UnsupportedEventTypeError:
            sub = self.create_subscription(msg_type, topic, lambda msg, i=i: self._on_frame(i, msg), qos,
                                           callback_group=group)
            self._loss.middleware_support(i, False)
        return sub

    def _unsubscribe(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            self.destroy_subscription(sub)
        self._monitor.set_paused(True)

    def _check_demand(self) -> None:
        """``lazy``: subscribe to the cameras while ``features`` or ``caption`` has a subscriber."""
        if not self._active:
            return
        wanted = sum(self.count_subscribers(t) for t in self._demand_topics) > 0
        if wanted and not self._subs:
            self._subscribe()
            self.get_logger().info("a subscriber appeared: subscribed to the cameras")
        elif not wanted and self._subs:
            self._unsubscribe()
            self.get_logger().info("no subscriber left: unsubscribed from the cameras")

    @property
    def subscribed(self) -> bool:
        """Whether the node is subscribed to its cameras now."""
        return bool(self._subs)

    # ------------------------------------------------------------------------- parameters
    def _declare(self, name: str, default: Any, ptype: int, description: str, *, read_only: bool = True,
                 constraints: str = "", bounds: Optional[Tuple[float, float]] = None) -> None:
        """Declare one parameter; ``bounds`` become its integer_range / floating_point_range
        (rqt_reconfigure's sliders; rclpy refuses values outside them)."""
        descriptor = ParameterDescriptor(
            name=name, type=ptype, description=description, read_only=read_only,
            additional_constraints=constraints, dynamic_typing=(ptype == _DOUBLE))
        if bounds is not None and ptype == _INT:
            descriptor.integer_range = [IntegerRange(from_value=int(bounds[0]), to_value=int(bounds[1]), step=1)]
        elif bounds is not None and ptype == _DOUBLE:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(bounds[0]), to_value=float(bounds[1]), step=0.0)]
        try:
            self.declare_parameter(name, default, descriptor)
        except InvalidParameterValueException as exc:
            raise ValueError(f"parameter {name}: {exc}") from None

    def _declare_parameters(self) -> None:
        d = self._declare
        d("camera_topics", ["camera_0/image_raw", "camera_1/image_raw", "camera_2/image_raw"], _STRINGS,
          "Camera topics (sensor_msgs/Image; CompressedImage if the name ends in /compressed), in set order.")
        topics = list(self.get_parameter("camera_topics").value)
        d("camera_names", default_camera_names(topics), _STRINGS,
          "Camera names used in messages and diagnostics, parallel to camera_topics (default: from the topics).")
        d("compressed", False, _BOOL, "Subscribe to every camera as sensor_msgs/CompressedImage.")
        d("sync.slop", AUTO_SLOP, _DOUBLE,
          "Largest stamp spread within one synchronized set (s); -1 = a third of the slowest expected frame "
          "period (diagnostics.expected_rates; 10 Hz where none is set).", constraints="-1 or >= 0",
          bounds=(AUTO_SLOP, 10.0))
        d("sync.queue_size", 10, _INT, "Frames kept per camera while waiting for a set.", constraints=">= 1",
          bounds=(1, 1000))
        d("sync.policy", "approximate_time", _STRING,
          "Set choice: approximate_time (message_filters' ApproximateTime: tightest sets) or max_sets "
          "(earliest in-slop set: the most sets).", constraints="approximate_time | max_sets")
        d("sync.reorder_tolerance", 0.0, _DOUBLE,
          "How far back (s) a camera's stamps may arrive out of order; 0 = in order.", constraints=">= 0",
          bounds=(0.0, 10.0))
        d("sync.stamp_source", "header", _STRING,
          "Frame time: header stamp, arrival time, or auto (header stamp, arrival time when it is zero).",
          constraints="header | arrival | auto")
        d("sync.reset_threshold", 1.0, _DOUBLE,
          "A camera stamp going back by more than this (s) resets the synchronizer (bag loop).", constraints="> 0",
          bounds=(0.001, 3600.0))
        d("video.frames", 0, _INT, "0: still images; K >= 2: each camera's clip of K frames ending at its "
          "matched frame.", constraints="0 or >= 2", bounds=(0, 64))
        d("video.stride", 1, _INT, "Clips take every s-th frame of their camera.", constraints=">= 1", bounds=(1, 100))
        d("batch.max_size", 4, _INT, "Most synchronized sets per model call.", read_only=False, constraints=">= 1",
          bounds=(1, 256))
        d("batch.max_wait_ms", 10.0, _DOUBLE,
          "How long the oldest waiting set may wait for a batch to fill (ms).", read_only=False, constraints=">= 0",
          bounds=(0.0, 10000.0))
        d("batch.queue_depth", 8, _INT,
          "Sets waiting for the model; when full the oldest is dropped.", constraints=">= 1", bounds=(1, 1024))
        d("max_rate", 0.0, _DOUBLE, "Most sets per second given to the model (node clock); the rest are dropped "
          "and counted. 0 = no cap.", read_only=False, constraints=">= 0", bounds=(0.0, 1000.0))
        d("lazy", False, _BOOL, "Subscribe to the cameras only while features or caption has a subscriber.")
        d("ask.queue_depth", 4, _INT, "Questions (~/ask) that may wait for the model; more are refused.",
          constraints=">= 1", bounds=(1, 64))
        d("model.path", "", _STRING,
          "Checkpoint directory or cached Hugging Face id; empty = the bundled tiny model (created on first use).")
        d("model.device", "auto", _STRING, "auto | cpu | cuda | cuda:K")
        d("model.dtype", "auto", _STRING, "auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
        d("model.min_pixels", 0, _INT, "Resize lower bound in pixels per image; 0 = the checkpoint's.",
          constraints=">= 0", bounds=(0, 1 << 30))
        d("model.max_pixels", 0, _INT, "Resize upper bound in pixels per image; 0 = the checkpoint's.",
          constraints=">= 0", bounds=(0, 1 << 30))
        d("model.warmup", True, _BOOL, "Run the model on black frames when configuring (BatchedQwenVL.warmup: "
          "on CUDA it captures the decode graphs and compiles the vision blocks for model.warmup_size).")
        d("model.warmup_size", "224x224", _STRING,
          "Frame sizes the cameras deliver, for the warm-up: HxW for all, HxW,HxW,... per camera, or empty: "
          "the first set's frames (warmed up in the worker before that set).")
        d("prompt", "Describe the scene.", _STRING, "Text given to the model with the images of each set.",
          read_only=False)
        d("features", ["vision", "hidden"], _STRINGS, "Tensors to publish: vision (per camera), hidden (decoder).",
          read_only=False, constraints="non-empty subset of [vision, hidden]")
        d("frame_id", "", _STRING, "header.frame_id of the output messages.", read_only=False)
        d("caption.enabled", False, _BOOL, "Also generate and publish a caption per set.", read_only=False)
        d("caption.max_new_tokens", 32, _INT, "Longest caption (and default ~/ask answer) in tokens.",
          read_only=False, constraints=">= 1", bounds=(1, 4096))
        d("qos.reliability", "best_effort", _STRING, "Reliability of the camera subscriptions.",
          constraints="best_effort | reliable")
        d("qos.depth", 5, _INT, "History depth of the camera subscriptions.", constraints=">= 1", bounds=(1, 1000))
        d("diagnostics.period", 1.0, _DOUBLE, "Period of /diagnostics (s).", constraints="> 0",
          bounds=(0.001, 3600.0))
        d("diagnostics.stale_after", 2.0, _DOUBLE, "A camera without a valid frame for this long is stale (s).",
          read_only=False, constraints="> 0", bounds=(0.001, 3600.0))
        d("diagnostics.hardware_id", "", _STRING,
          "hardware_id of the pipeline status; empty = the model device (e.g. cuda:0 NVIDIA H200).")
        d("diagnostics.expected_rates", [0.0], _DOUBLES,
          "Expected frame rate per camera (Hz), one value for all or one per camera; 0 = not checked.",
          constraints="each >= 0")
        d("diagnostics.rate_tolerance", 0.1, _DOUBLE,
          "Relative tolerance of the expected rates (FrequencyStatus' tolerance).", constraints="0..1",
          bounds=(0.0, 1.0))
        d("diagnostics.window", 5.0, _DOUBLE, "Window of the rates and of the drop check (s).", constraints="> 0",
          bounds=(0.1, 600.0))
        d("diagnostics.no_set_after", 3.0, _DOUBLE,
          "ERROR when every camera delivers but no set was made for this long (s).", constraints="> 0",
          bounds=(0.001, 3600.0))
        d("diagnostics.drop_warn_fraction", 0.2, _DOUBLE,
          "WARN when more than this fraction of frames or sets was dropped over the window.",
          constraints="0..1", bounds=(0.0, 1.0))
        d("max_input_pixels", DEFAULT_MAX_INPUT_PIXELS, _INT,
          "Largest height x width a frame may declare (checked from the header before decoding); "
          "larger frames are dropped as too_large. 0 = no limit.", constraints=">= 0", bounds=(0, 1 << 40))
        d("log_throttle", 5.0, _DOUBLE, "At most one log line per camera and error kind per this period (s).",
          constraints=">= 0", bounds=(0.0, 3600.0))
        if self.get_parameter("sync.slop").value != AUTO_SLOP:
            self._check_number("sync.slop", self.get_parameter("sync.slop").value)
        for name in ("sync.reset_threshold", "batch.max_wait_ms", "diagnostics.period",
                     "diagnostics.stale_after", "log_throttle", "sync.reorder_tolerance", "max_rate",
                     "diagnostics.window", "diagnostics.no_set_after"):
            self._check_number(name, self.get_parameter(name).value)
        for name in ("sync.queue_size", "batch.max_size", "batch.queue_depth", "caption.max_new_tokens",
                     "qos.depth", "video.stride"):
            if int(self.get_parameter(name).value) < 1:
                raise ValueError(f"parameter {name} must be >= 1")
        if int(self.get_parameter("video.frames").value) < 0 or int(self.get_parameter("video.frames").value) == 1:
            raise ValueError("parameter video.frames must be 0 (still images) or >= 2")

    def _value(self, name: str) -> Any:
        return self.get_parameter(name).value

    @staticmethod
    def _check_number(name: str, value: Any) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"parameter {name} must be a number, got {value!r}")
        lower_open = name in ("sync.reset_threshold", "diagnostics.period", "diagnostics.stale_after",
                              "diagnostics.window", "diagnostics.no_set_after")
        if value < 0 or (lower_open and value == 0):
            raise ValueError(f"parameter {name} must be {'> 0' if lower_open else '>= 0'}, got {value}")
        return None

    def _validate_parameters(self, params: List[Parameter]) -> SetParametersResult:
        try:
            for p in params:
                if p.name in ("batch.max_wait_ms", "diagnostics.stale_after", "max_rate"):
                    self._check_number(p.name, p.value)
                elif p.name in ("batch.max_size", "caption.max_new_tokens") and int(p.value) < 1:
                    raise ValueError(f"{p.name} must be >= 1")
                elif p.name == "features":
                    check_kinds(list(p.value))
        except (ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _add_parameter_callbacks(self) -> None:
        """Validation before a change, application after it. ``add_post_set_parameters_callback``
        arrived in Iron (rclpy 5); on Humble the accepted values are applied from the
        validation callback, once every parameter of the request has passed."""
        if hasattr(self, "add_post_set_parameters_callback"):
            self.add_on_set_parameters_callback(self._validate_parameters)
            self.add_post_set_parameters_callback(self._apply_parameters)
        else:
            self.add_on_set_parameters_callback(self._validate_and_apply_parameters)

    def _validate_and_apply_parameters(self, params: List[Parameter]) -> SetParametersResult:
        result = self._validate_parameters(params)
        if result.successful:
            self._apply_parameters(params)
        return result

    def _apply_parameters(self, params: List[Parameter]) -> None:
        if not self._configured:
            return  # read again when configuring
        for p in params:
            if p.name == "batch.max_size":
                self._batcher.configure(max_size=int(p.value))
            elif p.name == "batch.max_wait_ms":
                self._batcher.configure(max_wait_ms=float(p.value))
            elif p.name == "diagnostics.stale_after":
                self._monitor.stale_after_s = float(p.value)
            elif p.name == "max_rate":
                with self._lock:
                    self._rate.configure(float(p.value))

    def _load_model(self):
        import torch

        from ..model import BatchedQwenVL

        v = self._value
        path = resolve_checkpoint(str(v("model.path")))
        dtype = str(v("model.dtype"))
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        device = str(v("model.device")) or "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"model.device is {device!r} but CUDA is not available")
        self.get_logger().info(f"loading {path} on {device}")
        t0 = time.perf_counter()
        model = BatchedQwenVL.from_pretrained(
            path, device=device, dtype=dtype,
            min_pixels=int(v("model.min_pixels")) or None, max_pixels=int(v("model.max_pixels")) or None)
        self.get_logger().info(f"loaded {path} ({model.cfg.family}) on {model.device} as {model.dtype} "
                               f"in {time.perf_counter() - t0:.1f} s")
        return model

    # ------------------------------------------------------------------------- input side
    def _on_frame(self, index: int, msg: Any) -> None:
        """Subscription callback: convert, then hand to the synchronizer. Never raises."""
        self._monitor.frame_received(index)
        arrival_ns = self.get_clock().now().nanoseconds
        self._loss.frame(index, stamp_ns(msg.header.stamp))
        try:
            frame = msg_to_tensor(msg, self._device, min_size=MIN_SIDE, max_input_pixels=self._max_input_pixels)
            h, w = int(frame.shape[1]), int(frame.shape[2])
            problem = image_size_problem(h, w)  # frames the model cannot take are invalid input
            if problem:
                raise ValueError(problem)
        except Exception as exc:  # ConversionError, and anything a decoder may raise
            self._invalid_frame(index, exc)
            return
        stamp = self._frame_stamp(msg, arrival_ns)
        self._monitor.frame_valid(index, (h, w), frame_id=str(msg.header.frame_id))
        with self._lock:
            if self._clips is not None:
                self._clips.push(index, stamp, frame)
            resets = self._sync.resets
            sets = self._sync.add(index, stamp, Frame(frame, msg.header))
            self._monitor.frames_dropped(self._sync.drops)
            if self._sync.resets != resets:
                self._log_sync_reset()
            for sync_set in sets:
                if self._clips is not None:
                    sync_set = with_clips(self._clips, sync_set)  # None until every camera holds a clip
                    if sync_set is None:
                        continue
                self._latest = sync_set
                self._monitor.set_made()
                if self._rate.admit(arrival_ns):
                    self._batcher.put(sync_set)
                else:
                    self._monitor.sets_dropped("rate_limit")

    def _log_sync_reset(self) -> None:
        """Log a synchronizer reset with its cause, at most once per log_throttle period."""
        suppressed = self._log_throttle.check(("sync_reset",))
        if suppressed is None:
            return
        cause = self._sync.stats()["last_reset"] or {}
        k = cause.get("input")
        what = (f"camera {self._names[k]} stamp went back from {_stamps_text([cause['from_ns']])[1:-1]} to "
                f"{_stamps_text([max(0, cause['to_ns'])])[1:-1]}" if k is not None else "reset requested")
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        self.get_logger().warning(f"synchronizer reset: {what}; queued frames dropped{more}")

    def _frame_stamp(self, msg: Any, arrival_ns: int) -> int:
        if self._stamp_source == "arrival":
            return arrival_ns
        stamp = stamp_ns(msg.header.stamp)
        if stamp == 0 and self._stamp_source == "auto":
            return arrival_ns
        return stamp

    def _invalid_frame(self, index: int, error: Any) -> None:
        """Count the frame under a bounded reason key; log at most once per camera, key and period."""
        self._monitor.frame_invalid(index, error)
        topic = self._resolved_topics[index]
        key = reason_key(error)
        suppressed = self._log_throttle.check((index, key))
        if suppressed is not None:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            reason = (str(error) or type(error).__name__)[:200]
            self.get_logger().error(f"dropped a frame from {topic} ({key}): {reason}{more}")

    # ------------------------------------------------------------------------- model side
    def _run_batch(self, sets: List[SyncSet]) -> None:
        """Batcher worker: one model call for all sets, then one message (pair) per set."""
        if getattr(self, "_warm_pending", False):
            try:
                self._warm_up(warmup_frame_sizes([f.image for f in sets[0].items]))
            except Exception as exc:  # the batch itself still runs (and reports its own failure)
                self.get_logger().error(f"warm-up for the first set failed: {type(exc).__name__}: {exc}")
        settings = self._batch_settings()
        settings["epoch"] = self._epoch
        t0 = time.perf_counter()
        try:
            results = self._infer(sets, settings)
        except Exception as exc:
            if len(sets) == 1:
                raise
            self.get_logger().warning(
                f"model failed on a batch of {len(sets)} sets ({type(exc).__name__}: {exc}); "
                f"retrying them one at a time")
            for s in sets:
                try:
                    self._publish([s], self._infer([s], settings), settings)
                except Exception as one_exc:
                    self._on_model_error([s], one_exc)
            return
        self._monitor.batch_done(len(sets), time.perf_counter() - t0)
        self._publish(sets, results, settings)

    def _batch_settings(self) -> dict:
        v = self._value
        return {
            "prompt": str(v("prompt")), "kinds": list(v("features")), "frame_id": str(v("frame_id")),
            "caption": bool(v("caption.enabled")), "max_new_tokens": int(v("caption.max_new_tokens")),
        }

    def _infer(self, sets: Sequence[SyncSet], settings: dict):
        images = [[f.image for f in s.items] for s in sets]
        prompts = [settings["prompt"]] * len(sets)
        clip = {"fps": [list(s.fps) for s in sets]} if self._clips is not None else {}
        if settings["caption"]:
            return self.model.encode_generate(images, prompts, max_new_tokens=settings["max_new_tokens"], **clip)
        return self.model.encode(images, prompts, **clip), None

    def _publish(self, sets: Sequence[SyncSet], results, settings: dict) -> None:
        """One message (pair) per set. Sets of an older timeline (time went back while they ran)
        or finished after deactivation are dropped and counted; a failing publish is counted as
        ``publish_error`` (silently while the context shuts down), never as a model failure."""
        features, texts = results
        for b, s in enumerate(sets):
            reason = self._publish_drop_reason(settings)
            if reason is not None:
                self._monitor.sets_dropped(reason)
                continue
            info = set_info(s, self._names, self.model, self._model_name, settings["prompt"],
                            settings["frame_id"], self._geometry)
            kit, kinds = self._kit, settings["kinds"]
            try:
                tensors = [from_tensor(name, t) for name, t in sample_tensors(features, b, self._names, kinds)]
                rows = hidden_rows_of(features, b, self._placeholder_ids, self._names, kinds)
                self._features_pub.publish(kit.VisionFeatures(**features_fields(kit, info, tensors, rows)))
                if texts is not None:
                    self._caption_pub.publish(kit.Caption(**caption_fields(kit, info, texts[b])))
            except Exception as exc:
                self._publish_failed(exc)
                continue
            latency_s = (self.get_clock().now().nanoseconds - s.stamp) * 1e-9
            self._monitor.set_published(latency_s)

    def _publish_drop_reason(self, settings: dict) -> Optional[str]:
        if not self.context.ok():
            return "shutdown"
        if settings["epoch"] != self._epoch:
            return "time_reset"
        if not self._active:
            return "inactive"
        return None

    def _publish_failed(self, exc: BaseException) -> None:
        if not self.context.ok():
            self._monitor.sets_dropped("shutdown")
            return
        self._monitor.sets_dropped("publish_error")
        suppressed = self._log_throttle.check(("publish", type(exc).__name__))
        if suppressed is not None:
            self.get_logger().warning(f"publishing a set failed: {type(exc).__name__}: {exc}")

    def _on_model_error(self, sets: List[SyncSet], exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if not self.context.ok():  # shutting down: nothing to report
            self._monitor.sets_dropped("shutdown", len(sets))
            return
        self._monitor.model_error(len(sets), reason)
        stamps = "; ".join(_stamps_text(s.stamps) for s in sets)
        self.get_logger().error(f"model failed on {len(sets)} set(s) with camera stamps {stamps}: {reason}")

    # ------------------------------------------------------------------------- time and health
    def _on_time_jump(self, jump) -> None:
        backwards = jump.delta.nanoseconds < 0
        if not backwards and jump.clock_change == ClockChange.ROS_TIME_NO_CHANGE:
            return
        with self._lock:
            self._sync.reset()
            self._latest = None
            self._epoch += 1
            self._rate.configure(self._rate.max_rate)
            dropped = self._batcher.clear("time_reset")
            if self._clips is not None:
                self._clips.reset()
        self._monitor.sets_dropped("time_reset", dropped)
        self._monitor.clear_latency()
        what = "went back" if backwards else "changed source"
        self.get_logger().info(f"time {what} ({jump.delta.nanoseconds * 1e-9:+.3f} s): synchronizer reset, "
                               f"{dropped} queued set(s) of the old timeline dropped")

    def _publish_diagnostics(self) -> None:
        try:
            statuses = self._monitor.statuses(
                self.get_fully_qualified_name(), self._sync.stats(), self._batcher.stats(),
                extra=[("model", self._model_name), ("device", str(self._device)),
                       ("active", str(self._active).lower()), ("subscribed", str(self.subscribed).lower()),
                       ("graph captures after warm-up", str(getattr(self.model, "late_captures", 0)))]
                + self._clip_diagnostics())
            self._log_no_set(statuses[0])
            stale = set(self._monitor.stale_cameras())
            for name in sorted(stale - self._stale_reported):
                self.get_logger().warning(f"camera {name} is stale (no valid frame for "
                                          f"{self._monitor.stale_after_s:.1f} s)")
            for name in sorted(self._stale_reported - stale):
                self.get_logger().info(f"camera {name} is back")
            self._stale_reported = stale
            statuses.append(self._loss.status(self.get_fully_qualified_name()))
            self._diag_pub.publish(to_diagnostic_array(statuses, self.get_clock().now().to_msg(),
                                                       hardware_ids=self._hardware_ids()))
        except Exception as exc:  # diagnostics must never take the node down
            if self.context.ok():
                self.get_logger().error(f"diagnostics failed: {type(exc).__name__}: {exc}")

    def _hardware_ids(self) -> List[str]:
        """Pipeline: the model device (or diagnostics.hardware_id); cameras: their frame_id."""
        cams = self._monitor.snapshot()["cameras"]
        return [self._hardware_id] + [c["frame_id"] or c["topic"] for c in cams]

    def _log_no_set(self, summary) -> None:
        """The no-set ERROR goes to the log too, at most once per log_throttle."""
        level, _, message, _ = summary
        if level == ERROR and self._monitor.no_set_problem() is not None:
            if self._log_throttle.check(("no_set",)) is not None:
                self.get_logger().error(message)

    # ------------------------------------------------------------------------- ~/ask
    def _newest_set(self):
        with self._lock:
            latest = self._latest if self._active else None
        if latest is None:
            return None
        return latest, [f.header for f in latest.items]

    def _why_no_set(self) -> str:
        if not self._active:
            return "the node is not active"
        if not self._subs:
            return "lazy: nobody subscribes to features or caption, so the cameras are not subscribed"
        received = ", ".join(f"{c['name']} {c['received']}" for c in self._monitor.snapshot()["cameras"])
        return f"the synchronizer has made no set yet (frames received: {received})"

    def _clip_diagnostics(self) -> list:
        """Clip counters as summary key-values: restarts per camera by reason, sets without a clip."""
        if self._clips is None:
            return []
        st = self._clips.stats()
        out = [("clip frames", f"{self._value('video.frames')} every {self._value('video.stride')}"),
               ("sets without a full clip", str(st["incomplete"]))]
        for name, restarts in zip(self._names, st["restarts"]):
            out.append((f"clip restarts {name}", ", ".join(f"{r} {n}" for r, n in restarts.items())))
        return out

    # ------------------------------------------------------------------------- introspection
    @property
    def camera_names(self) -> List[str]:
        return list(self._names)

    @property
    def camera_topics(self) -> List[str]:
        return list(self._resolved_topics)

    @property
    def slop_ns(self) -> int:
        """The synchronizer's slop in ns (sync.slop, or the default derived from expected rates)."""
        return self._sync.slop

    def pipeline_stats(self) -> dict:
        """Synchronizer, batcher and monitor counters in one dict (tests, tools)."""
        out = {"sync": self._sync.stats(), "batch": self._batcher.stats(), "monitor": self._monitor.snapshot()}
        if self._clips is not None:
            with self._lock:
                out["clips"] = self._clips.stats()
        return out

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        return self._batcher.wait_idle(timeout)

    @property
    def ask_server(self) -> "AskServer":
        return self._ask

    def destroy_node(self) -> None:
        """Stop the worker (the batch in flight finishes, queued sets are discarded), then the node."""
        self._active = False
        self._cleanup()
        super().destroy_node()


class QvlNode(QvlPipeline, Node):
    """The ``qvl_node`` node, configured and active from construction. ``model``: an already
    loaded ``BatchedQwenVL`` to use instead of loading ``model.path`` (tests and embedding
    applications); other keyword arguments go to ``rclpy.node.Node`` (``context``,
    ``namespace``, ``parameter_overrides``, ...)."""

    def __init__(self, *, model: Any = None, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self._read_config()
        self._configure(model)
        self._activate()
        self._log_ready()


class QvlLifecycleNode(QvlPipeline, LifecycleNode):
    """``qvl_node`` as a managed (lifecycle) node: construction only declares the parameters;
    ``configure`` loads and warms up the model, ``activate`` subscribes and publishes,
    ``deactivate`` stops and drops the queued sets, ``cleanup`` frees the model. Transitions
    come from the ``~/change_state`` service (``ros2 lifecycle set``, launch) or trigger_*()."""

    def __init__(self, *, model: Any = None, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self._given_model = model
        self._read_config()

    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure(self._given_model)
        except Exception as exc:
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            self._cleanup()
            return TransitionCallbackReturn.FAILURE
        self._log_ready()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._activate()
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        if self._active:
            self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        if self._active:
            self._deactivate()
        self._cleanup()
        return TransitionCallbackReturn.SUCCESS



def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qvl_node`` / ``python -m qvl_ros.ros.node``; returns the exit code.
    Start, spin and the end on a signal: :func:`qvl_ros.ros.spin.run`."""
    import faulthandler

    from ..model.kernels import tune_cpu_allocator
    from .spin import run

    faulthandler.enable()  # a crash in native code (rcl, DDS, torch) leaves every thread's Python stack in the log

    tune_cpu_allocator()  # before the model thread allocates (see its docstring)
    args = list(sys.argv if argv is None else argv)
    from rclpy.utilities import remove_ros_args

    parser = argparse.ArgumentParser(prog="qvl_node", description="Batched Qwen-VL features from synchronized cameras.")
    parser.add_argument("--managed", action="store_true",
                        help="start as a lifecycle node (unconfigured; configure/activate through ~/change_state)")
    options = parser.parse_args(remove_ros_args(args)[1:])
    return run(lambda: QvlLifecycleNode() if options.managed else QvlNode(), args=args, name=NODE_NAME)


if __name__ == "__main__":
    from .spin import catch_signals, exit_now

    catch_signals()  # late (torch is imported), but before the model loads
    exit_now(main())
