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

Parameters are declared with descriptors in ``QvlNode.__init__``; ``config/multi_cam.yaml``
documents every one. Those that need a restart (topics, QoS, synchronizer, queue depth, model)
are read-only; ``prompt``, ``features``, ``frame_id``, ``caption.*``, ``batch.max_size``,
``batch.max_wait_ms`` and ``diagnostics.stale_after`` can be changed at run time.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, List, Optional, Sequence

import rclpy
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockChange, ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from ..core.batcher import Batcher
from ..core.conversion import DEFAULT_MAX_INPUT_PIXELS, msg_to_tensor
from ..core.input_loss import InputLossEstimator
from ..core.diagnostics import LogThrottle, PipelineMonitor, reason_key, to_diagnostic_array
from .feature_msgs import caption_msg, check_kinds, vision_features_msg
from ..model.checkpoint import resolve_checkpoint
from ..core.synchronizer import SyncSet, Synchronizer
from ..core.topics import camera_names as default_camera_names

__all__ = ["QvlNode", "main", "default_camera_names"]

NODE_NAME = "qvl_node"
# The model needs at least 28 px per side (one merged 2x2 patch of 14 px) and an aspect ratio
# of at most 200; frames outside that are invalid input, rejected in the callback.
MIN_SIDE = 28
MAX_ASPECT = 200.0

_STRING, _STRINGS = ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_STRING_ARRAY
_INT, _DOUBLE, _BOOL = ParameterType.PARAMETER_INTEGER, ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_BOOL


def _stamps_text(stamps_ns: Sequence[int]) -> str:
    return "[" + ", ".join(f"{s // 1_000_000_000}.{s % 1_000_000_000:09d}" for s in stamps_ns) + "]"


class QvlNode(Node):
    """The ``qvl_node`` node. ``model``: an already loaded ``BatchedQwenVL`` to use instead of
    loading ``model.path`` (tests and embedding applications); other keyword arguments go to
    ``rclpy.node.Node`` (``context``, ``namespace``, ``parameter_overrides``, ...)."""

    def __init__(self, *, model: Any = None, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
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
        reliability = str(v("qos.reliability")).lower()
        if reliability not in ("best_effort", "reliable"):
            raise ValueError(f"qos.reliability must be best_effort or reliable, got {reliability!r}")

        # --- model ---------------------------------------------------------------------------
        if model is None:
            model = self._load_model()
        self.model = model
        self._model_name = str(getattr(model, "name", "") or v("model.path"))
        self._device = model.device

        # --- components ----------------------------------------------------------------------
        self._lock = threading.Lock()  # synchronizer add + batcher put, in one order
        self._sync = Synchronizer(
            len(self._topics), int(round(float(v("sync.slop")) * 1e9)), int(v("sync.queue_size")),
            reset_threshold=int(round(float(v("sync.reset_threshold")) * 1e9)))
        self._batcher: Batcher[SyncSet] = Batcher(
            self._run_batch, max_size=int(v("batch.max_size")), max_wait_ms=float(v("batch.max_wait_ms")),
            queue_depth=int(v("batch.queue_depth")), on_error=self._on_model_error, name="qvl_batch_worker")
        self._log_throttle = LogThrottle(float(v("log_throttle")))
        self._max_input_pixels = int(v("max_input_pixels"))
        self._loss = InputLossEstimator(self._names)

        # --- ROS interfaces ------------------------------------------------------------------
        from qvl_ros.msg import Caption, VisionFeatures
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import CompressedImage, Image

        camera_qos = QoSProfile(
            history=qos_profile_sensor_data.history, depth=int(v("qos.depth")),
            reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE),
            durability=qos_profile_sensor_data.durability)
        compressed_all = bool(v("compressed"))
        self._subs = []
        for i, topic in enumerate(self._topics):
            is_compressed = compressed_all or topic.rstrip("/").split("/")[-1] == "compressed"
            msg_type = CompressedImage if is_compressed else Image
            self._subs.append(self._subscribe_camera(i, msg_type, topic, camera_qos))
        self._resolved_topics = [s.topic_name for s in self._subs]
        self._monitor = PipelineMonitor(self._names, self._resolved_topics,
                                        stale_after_s=float(v("diagnostics.stale_after")))
        self._features_pub = self.create_publisher(VisionFeatures, "features", 10)
        self._caption_pub = self.create_publisher(Caption, "caption", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_timer = self.create_timer(float(v("diagnostics.period")), self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup(), clock=self._steady)
        self._stale_reported: set = set()
        # A backward jump of ROS time (bag loop, simulation reset) or a switch of time source
        # makes queued stamps meaningless: start over.
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(seconds=-1), on_clock_change=True),
            post_callback=self._on_time_jump)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._batcher.start()
        cams = ", ".join(f"{n} <- {t} ({s.msg_type.__name__})" for n, t, s in
                         zip(self._names, self._resolved_topics, self._subs))
        self.get_logger().info(
            f"ready: {len(self._topics)} cameras [{cams}]; model {self._model_name} on {self._device}; "
            f"publishing {self.resolve_topic_name('features')}"
            + (f" and {self.resolve_topic_name('caption')}" if v("caption.enabled") else ""))

    # ------------------------------------------------------------------------- parameters
    def _declare(self, name: str, default: Any, ptype: int, description: str, *, read_only: bool = True,
                 constraints: str = "") -> None:
        self.declare_parameter(name, default, ParameterDescriptor(
            name=name, type=ptype, description=description, read_only=read_only,
            additional_constraints=constraints, dynamic_typing=(ptype == _DOUBLE)))

    def _declare_parameters(self) -> None:
        d = self._declare
        d("camera_topics", ["camera_0/image_raw", "camera_1/image_raw", "camera_2/image_raw"], _STRINGS,
          "Camera topics (sensor_msgs/Image; CompressedImage if the name ends in /compressed), in set order.")
        topics = list(self.get_parameter("camera_topics").value)
        d("camera_names", default_camera_names(topics), _STRINGS,
          "Camera names used in messages and diagnostics, parallel to camera_topics (default: from the topics).")
        d("compressed", False, _BOOL, "Subscribe to every camera as sensor_msgs/CompressedImage.")
        d("sync.slop", 0.03, _DOUBLE, "Largest stamp spread within one synchronized set (s).", constraints=">= 0")
        d("sync.queue_size", 10, _INT, "Frames kept per camera while waiting for a set.", constraints=">= 1")
        d("sync.stamp_source", "header", _STRING,
          "Frame time: header stamp, arrival time, or auto (header stamp, arrival time when it is zero).",
          constraints="header | arrival | auto")
        d("sync.reset_threshold", 1.0, _DOUBLE,
          "A camera stamp going back by more than this (s) resets the synchronizer (bag loop).", constraints="> 0")
        d("batch.max_size", 4, _INT, "Most synchronized sets per model call.", read_only=False, constraints=">= 1")
        d("batch.max_wait_ms", 10.0, _DOUBLE,
          "How long the oldest waiting set may wait for a batch to fill (ms).", read_only=False, constraints=">= 0")
        d("batch.queue_depth", 8, _INT,
          "Sets waiting for the model; when full the oldest is dropped.", constraints=">= 1")
        d("model.path", "", _STRING,
          "Checkpoint directory or cached Hugging Face id; empty = the bundled tiny model (created on first use).")
        d("model.device", "auto", _STRING, "auto | cpu | cuda | cuda:K")
        d("model.dtype", "auto", _STRING, "auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
        d("model.min_pixels", 0, _INT, "Resize lower bound in pixels per image; 0 = the checkpoint's.",
          constraints=">= 0")
        d("model.max_pixels", 0, _INT, "Resize upper bound in pixels per image; 0 = the checkpoint's.",
          constraints=">= 0")
        d("prompt", "Describe the scene.", _STRING, "Text given to the model with the images of each set.",
          read_only=False)
        d("features", ["vision", "hidden"], _STRINGS, "Tensors to publish: vision (per camera), hidden (decoder).",
          read_only=False, constraints="non-empty subset of [vision, hidden]")
        d("frame_id", "", _STRING, "header.frame_id of the output messages.", read_only=False)
        d("caption.enabled", False, _BOOL, "Also generate and publish a caption per set.", read_only=False)
        d("caption.max_new_tokens", 32, _INT, "Longest caption in tokens.", read_only=False, constraints=">= 1")
        d("qos.reliability", "best_effort", _STRING, "Reliability of the camera subscriptions.",
          constraints="best_effort | reliable")
        d("qos.depth", 5, _INT, "History depth of the camera subscriptions.", constraints=">= 1")
        d("diagnostics.period", 1.0, _DOUBLE, "Period of /diagnostics (s).", constraints="> 0")
        d("diagnostics.stale_after", 2.0, _DOUBLE, "A camera without a valid frame for this long is stale (s).",
          read_only=False, constraints="> 0")
        d("max_input_pixels", DEFAULT_MAX_INPUT_PIXELS, _INT,
          "Largest height x width a frame may declare (checked from the header before decoding); "
          "larger frames are dropped as too_large. 0 = no limit.", constraints=">= 0")
        d("log_throttle", 5.0, _DOUBLE, "At most one log line per camera and error kind per this period (s).",
          constraints=">= 0")
        for name in ("sync.slop", "sync.reset_threshold", "batch.max_wait_ms", "diagnostics.period",
                     "diagnostics.stale_after", "log_throttle"):
            self._check_number(name, self.get_parameter(name).value)
        for name in ("sync.queue_size", "batch.max_size", "batch.queue_depth", "caption.max_new_tokens",
                     "qos.depth"):
            if int(self.get_parameter(name).value) < 1:
                raise ValueError(f"parameter {name} must be >= 1")

    def _value(self, name: str) -> Any:
        return self.get_parameter(name).value

    @staticmethod
    def _check_number(name: str, value: Any) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"parameter {name} must be a number, got {value!r}")
        lower_open = name in ("sync.reset_threshold", "diagnostics.period", "diagnostics.stale_after")
        if value < 0 or (lower_open and value == 0):
            raise ValueError(f"parameter {name} must be {'> 0' if lower_open else '>= 0'}, got {value}")
        return None

    def _validate_parameters(self, params: List[Parameter]) -> SetParametersResult:
        try:
            for p in params:
                if p.name in ("batch.max_wait_ms", "diagnostics.stale_after"):
                    self._check_number(p.name, p.value)
                elif p.name in ("batch.max_size", "caption.max_new_tokens") and int(p.value) < 1:
                    raise ValueError(f"{p.name} must be >= 1")
                elif p.name == "features":
                    check_kinds(list(p.value))
        except (ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: List[Parameter]) -> None:
        for p in params:
            if p.name == "batch.max_size":
                self._batcher.configure(max_size=int(p.value))
            elif p.name == "batch.max_wait_ms":
                self._batcher.configure(max_wait_ms=float(p.value))
            elif p.name == "diagnostics.stale_after":
                self._monitor.stale_after_s = float(p.value)

    def _load_model(self):
        import torch

        from ..model import BatchedQwenVL

        v = self._value
        path = resolve_checkpoint(str(v("model.path")))
        dtype = str(v("model.dtype"))
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        device = str(v("model.device")) or "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"model.device is {device!r} but CUDA is not available")
        t0 = time.perf_counter()
        model = BatchedQwenVL.from_pretrained(
            path, device=device, dtype=dtype,
            min_pixels=int(v("model.min_pixels")) or None, max_pixels=int(v("model.max_pixels")) or None)
        self.get_logger().info(f"loaded {path} ({model.cfg.family}) on {model.device} as {model.dtype} "
                               f"in {time.perf_counter() - t0:.1f} s")
        return model

    # ------------------------------------------------------------------------- input side
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

    def _on_frame(self, index: int, msg: Any) -> None:
        """Subscription callback: convert, then hand to the synchronizer. Never raises."""
        self._monitor.frame_received(index)
        arrival_ns = self.get_clock().now().nanoseconds
        self._loss.frame(index, int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec))
        try:
            frame = msg_to_tensor(msg, self._device, min_size=MIN_SIDE, max_input_pixels=self._max_input_pixels)
            h, w = int(frame.shape[1]), int(frame.shape[2])
            if max(h, w) / min(h, w) > MAX_ASPECT:
                raise ValueError(f"aspect ratio of {w}x{h} exceeds {MAX_ASPECT:.0f}")
        except Exception as exc:  # ConversionError, and anything a decoder may raise
            self._invalid_frame(index, exc)
            return
        stamp = self._frame_stamp(msg, arrival_ns)
        self._monitor.frame_valid(index, (h, w))
        with self._lock:
            resets = self._sync.resets
            for sync_set in self._sync.add(index, stamp, frame):
                self._batcher.put(sync_set)
            if self._sync.resets != resets:
                self._log_sync_reset()

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
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
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
        settings = self._batch_settings()
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
        images = [list(s.items) for s in sets]
        prompts = [settings["prompt"]] * len(sets)
        if settings["caption"]:
            return self.model.encode_generate(images, prompts, max_new_tokens=settings["max_new_tokens"])
        return self.model.encode(images, prompts), None

    def _publish(self, sets: Sequence[SyncSet], results, settings: dict) -> None:
        features, texts = results
        for b, s in enumerate(sets):
            stamps = list(s.stamps)
            msg = vision_features_msg(features, b, self._names, stamps, settings["kinds"], self._model_name,
                                      settings["prompt"], settings["frame_id"])
            self._features_pub.publish(msg)
            if texts is not None:
                self._caption_pub.publish(caption_msg(texts[b], self._names, stamps, self._model_name,
                                                      settings["prompt"], settings["frame_id"]))
            latency_s = (self.get_clock().now().nanoseconds - s.stamp) * 1e-9
            self._monitor.set_published(latency_s)

    def _on_model_error(self, sets: List[SyncSet], exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
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
        self._monitor.clear_latency()
        what = "went back" if backwards else "changed source"
        self.get_logger().info(f"time {what} ({jump.delta.nanoseconds * 1e-9:+.3f} s): synchronizer reset")

    def _publish_diagnostics(self) -> None:
        try:
            statuses = self._monitor.statuses(
                self.get_fully_qualified_name(), self._sync.stats(), self._batcher.stats(),
                extra=[("model", self._model_name), ("device", str(self._device))])
            stale = set(self._monitor.stale_cameras())
            for name in sorted(stale - self._stale_reported):
                self.get_logger().warning(f"camera {name} is stale (no valid frame for "
                                          f"{self._monitor.stale_after_s:.1f} s)")
            for name in sorted(self._stale_reported - stale):
                self.get_logger().info(f"camera {name} is back")
            self._stale_reported = stale
            statuses.append(self._loss.status(self.get_fully_qualified_name()))
            self._diag_pub.publish(to_diagnostic_array(statuses, self.get_clock().now().to_msg()))
        except Exception as exc:  # diagnostics must never take the node down
            self.get_logger().error(f"diagnostics failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------- introspection
    @property
    def camera_names(self) -> List[str]:
        return list(self._names)

    @property
    def camera_topics(self) -> List[str]:
        return list(self._resolved_topics)

    def pipeline_stats(self) -> dict:
        """Synchronizer, batcher and monitor counters in one dict (tests, tools)."""
        return {"sync": self._sync.stats(), "batch": self._batcher.stats(), "monitor": self._monitor.snapshot()}

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        return self._batcher.wait_idle(timeout)

    def destroy_node(self) -> None:
        """Stop the worker (the batch in flight finishes, queued sets are discarded), then the node."""
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.stop(drain=False, timeout=30.0)
        super().destroy_node()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``qvl_node`` / ``python -m qvl_ros.ros.node``; returns the exit code."""
    from ..model.kernels import tune_cpu_allocator

    tune_cpu_allocator()  # before the model thread allocates (see its docstring)
    args = list(sys.argv if argv is None else argv)
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = QvlNode()
        executor = SingleThreadedExecutor()  # see the module doc
        executor.add_node(node)
        try:
            executor.spin()
        finally:
            executor.shutdown(timeout_sec=1.0)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:
        msg = f"{NODE_NAME} failed: {type(exc).__name__}: {exc}"
        if node is not None:
            node.get_logger().fatal(msg)
        else:
            print(msg, file=sys.stderr)
        code = 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
