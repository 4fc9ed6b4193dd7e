"""The pipeline of ``qvl_node`` as a mixin of rclpy node classes (:class:`QvlNodeMixin`): set-up,
camera subscriptions, parameters, the input side (the intake, :mod:`qvl_ros.core.intake`), time
jumps, ``~/ask`` and introspection. The model side and the outputs: :mod:`qvl_ros.ros.node_results`;
the node classes and ``main``: :mod:`qvl_ros.ros.node`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, List, Optional

from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockChange, ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from ..core.ask_request import AskLimits, DetectLimits
from ..core.batcher import Batcher
from ..core.diagnostics import LogThrottle, PipelineMonitor, expected_rates, reason_key
from ..core.input_loss import InputLossEstimator
from ..core.intake import Intake, IntakeSettings
from ..core.params import BY_NAME, detect_problem, slop_ns
from ..core.stamps import format_stamp, stamp_ns, stamp_problem
from ..core.stop_switch import StopSwitch
from ..core.synchronizer import SyncSet
from ..core.warmup import batch_sizes as warmup_batch_sizes
from ..core.warmup import parse_sizes as parse_warmup_sizes
from ..model.checkpoint import resolve_checkpoint
from .actions import AskAction, DetectAction
from .ask import AskServer
from .detection_msgs import rclpy_types
from .feature_msgs import MessageKit, placeholder_token_ids
from .node_detections import DetectionOutputs
from .node_results import NodeResults, describe_device, release_device_memory
from .params import declare_parameters, validate_changes
from .spin import interruptible

__all__ = ["QvlNodeMixin", "LAZY_CHECK_PERIOD"]

LAZY_CHECK_PERIOD = 0.2  # s between two looks at the subscriber count with lazy=true
DETECT_PARAMS = tuple(name for name in BY_NAME if name.startswith("detect."))
WORKER_STOP_S = 30.0  # longest wait for the worker after its work was stopped (a vision pass and prefill)


class QvlNodeMixin(NodeResults):
    """What ``qvl_node`` does, shared by :class:`~qvl_ros.ros.node.QvlNode` (plain) and
    :class:`~qvl_ros.ros.node.QvlLifecycleNode` (managed): a mixin of an rclpy node class (the
    model side, publishing and diagnostics: :class:`~qvl_ros.ros.node_results.NodeResults`). Its steps:

    * :meth:`_read_config` (construction): declare and check the parameters;
    * :meth:`_configure`: load the model and warm it up, make the synchronizer, batcher and
      monitor, the publishers and the diagnostics timer;
    * :meth:`_activate`: subscribe to the cameras (with ``lazy``: whenever someone listens);
    * :meth:`_deactivate`: unsubscribe, drop the queued sets and questions, stop the batch and
      the answer in flight at their next decode step and wait for them;
    * :meth:`_cleanup`: the same, then join the worker, destroy the outputs and free the model.

    ``~/ask`` (its service and guard condition) and the actions ``~/ask`` and ``~/detect``
    (:mod:`qvl_ros.ros.actions`) live from construction to ``destroy_node``, so a response or result
    is never sent through a destroyed handle; they refuse work while the node is not active.
    """

    _configured = False
    _active = False
    model: Any = None

    # ------------------------------------------------------------------------- set-up steps
    def _read_config(self) -> None:
        """Declare the parameters and check the settings that are fixed for the node's life."""
        declare_parameters(self)  # the table's rules (core/params.py), each checked once
        v = self._value
        self._topics = [str(t) for t in v("camera_topics")]
        self._names = [str(n) for n in v("camera_names")]
        reliability = str(v("qos.reliability"))
        self._camera_qos = QoSProfile(
            history=qos_profile_sensor_data.history, depth=int(v("qos.depth")),
            reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE),
            durability=qos_profile_sensor_data.durability)
        self._expected_rates = expected_rates(list(v("diagnostics.expected_rates")), len(self._topics))
        self._resolved_topics = [self.resolve_topic_name(t) for t in self._topics]
        self._subs: List[Any] = []
        self._add_parameter_callbacks()
        self._stops = StopSwitch()  # every generation of the worker, stopped by transitions
        self._batcher = None
        self._ask = AskServer(
            self, latest=self._newest_set, submit=self._submit_answer, camera_names=self._names,
            limits=self._ask_limits, why_no_set=self._why_no_set, control=self._stops.control,
            between_chunks=lambda: self._batcher.run_due_batches(),
            request_depth=max(int(v("ask.request_depth")), int(v("ask.queue_depth"))))
        self._actions = self._create_actions()

    def _create_actions(self) -> list:
        """The actions ~/ask and, where vision_msgs and the Detect action are installed, ~/detect
        (ros/actions.py); they live as long as the node, like the ~/ask service."""
        shared = dict(latest=self._newest_set, submit=self._submit_answer, camera_names=self._names,
                      why_no_set=self._why_no_set, control=self._stops.control,
                      between_chunks=lambda: self._batcher.run_due_batches(),
                      request_depth=max(int(self._value("ask.request_depth")), int(self._value("ask.queue_depth"))),
                      log_throttle_s=float(self._value("log_throttle")))
        actions = [AskAction(self, limits=self._ask_limits, **shared)]
        try:
            types = rclpy_types()
            from qvl_ros.action import Detect  # noqa: F401  (built only where vision_msgs is installed)
        except ImportError as exc:
            self.get_logger().info(f"no ~/detect action: {exc}")
            return actions
        actions.append(DetectAction(self, limits=self._detect_limits, types=types, **shared))
        return actions

    @property
    def actions(self) -> dict:
        """The action servers by kind ("ask", "detect")."""
        return {a.kind: a for a in self._actions}

    def _configure(self, model: Any = None) -> None:
        """Model, pipeline components and outputs; the node then waits for :meth:`_activate`.
        A signal abandons the model load and the warm-up at once (spin.interruptible)."""
        with interruptible():
            self.model = model if model is not None else self._load_model()
            self._model_name = str(getattr(self.model, "name", "") or self._value("model.path"))
            self._device = self.model.device
            self._geometry: dict = {}  # (height, width, frames) -> Geometry, for the messages' inputs
            self._placeholder_ids = placeholder_token_ids(self.model)
            problem = self._prompt_problem(str(self._value("prompt")))
            if problem:
                raise ValueError(f"parameter prompt: {problem}")
            if self._value("model.warmup"):
                self._warm_up()
        self._create_components()
        self._create_outputs()
        self._configured = True

    def _create_components(self) -> None:
        v = self._value
        old = getattr(self, "_batcher", None)
        if old is not None and not old.join(WORKER_STOP_S):  # never two workers on one model
            raise RuntimeError("the previous model worker is still running; configure again later")
        self._lock = threading.Lock()  # synchronizer add + batcher put, in one order
        # conversion, input checks, stamps, synchronizer, clips, max_rate: core/intake.py
        self._intake = Intake(len(self._topics), self._intake_settings(), self._device)
        self._sync, self._clips = self._intake.sync, self._intake.clips
        self._batcher: Batcher[SyncSet] = Batcher(
            self._run_batch, max_size=int(v("batch.max_size")), max_wait_ms=float(v("batch.max_wait_ms")),
            queue_depth=int(v("batch.queue_depth")), on_error=self._on_model_error, name="qvl_batch_worker",
            on_drop=lambda _set: self._monitor.sets_dropped("queue_full"),
            task_depth=int(v("ask.queue_depth")))
        self._log_throttle = LogThrottle(float(v("log_throttle")))
        self._loss = InputLossEstimator(self._names)
        self._monitor = PipelineMonitor(self._names, self._resolved_topics, **self._monitor_options())
        self._monitor.set_paused(True)  # until the cameras are subscribed
        self._latest: Optional[SyncSet] = None  # newest set the synchronizer made (for ~/ask)
        self._epoch = 0  # bumped when time jumps back: results of older sets are not published
        self._stale_reported: set = set()
        self._batcher.start()

    def _intake_settings(self) -> IntakeSettings:
        v = self._value
        return IntakeSettings(
            slop_ns=slop_ns(float(v("sync.slop")), self._expected_rates), queue_size=int(v("sync.queue_size")), policy=str(v("sync.policy")),
            reorder_ns=int(round(float(v("sync.reorder_tolerance")) * 1e9)),
            reset_ns=int(round(float(v("sync.reset_threshold")) * 1e9)), stamp_source=str(v("sync.stamp_source")),
            clip_frames=int(v("video.frames")), clip_stride=int(v("video.stride")), max_rate=float(v("max_rate")),
            max_input_pixels=int(v("max_input_pixels")))

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
        self._detections = DetectionOutputs(self, self._names, bool(v("detect.annotated_image")))
        if self._detections.unavailable:
            self.get_logger().warning(f"detections are off: {self._detections.unavailable}")
        elif v("detect.enabled"):
            self._create_detection_outputs()
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

    def _create_detection_outputs(self) -> None:
        for problem in self._detections.create():
            self.get_logger().error(f"no detections for {problem}")

    def _activate(self) -> None:
        self._stops.allow()
        self._active = True
        if self._value("lazy"):
            self._demand_timer = self.create_timer(LAZY_CHECK_PERIOD, self._check_demand,
                                                   callback_group=MutuallyExclusiveCallbackGroup(), clock=self._steady)
            self._check_demand()
        else:
            self._subscribe()

    def _deactivate(self) -> None:
        """Stop taking frames, drop the queued sets (counted ``inactive``) and questions, stop the
        batch and the answer in flight at their next decode step and wait for them (the batch's
        results are not published; the answer returns what it has, marked stopped)."""
        self._active = False
        if self._demand_timer is not None:
            self.destroy_timer(self._demand_timer)
            self._demand_timer = None
        self._unsubscribe()
        with self._lock:
            self._latest = None
            dropped = self._batcher.clear("inactive")
        self._monitor.sets_dropped("inactive", dropped)
        self._stop_work("node deactivated")
        if not self._batcher.wait_for(lambda s: s["running"] == 0 and not s["task_running"], WORKER_STOP_S):
            self.get_logger().error(f"deactivate: the model worker did not stop within {WORKER_STOP_S:.0f} s")

    def _stop_work(self, reason: str) -> None:
        """Stop every generation at its next decode step (and those that start later, until
        activate) and cancel the questions waiting for the worker."""
        self._stops.stop_all(reason)
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.cancel_tasks(reason)

    def _cleanup(self) -> None:
        """Stop the worker (queued sets are discarded), destroy the outputs, free the model.
        Tolerates a partial configuration (a configure that failed half way)."""
        self._configured = False
        if getattr(self, "_stops", None) is not None:
            self._stop_work("node cleaned up")
        batcher = getattr(self, "_batcher", None)
        if batcher is not None and not batcher.stop(drain=False, timeout=WORKER_STOP_S):
            self.get_logger().error(f"cleanup: the model worker did not stop within {WORKER_STOP_S:.0f} s")
        if getattr(self, "_detections", None) is not None:
            self._detections.destroy()
            self._detections = None
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
            + (f"; detections on {', '.join(self._detections.topics())}" if self._detections and v("detect.enabled")
               and self._detections.created else "")
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
        """``lazy``: subscribe to the cameras while ``features``, ``caption`` or a detection topic
        has a subscriber."""
        if not self._active:
            return
        detections = self._detections.topics() if self._detections is not None else []
        wanted = sum(self.count_subscribers(t) for t in self._demand_topics + detections) > 0
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
    def _value(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _validate_parameters(self, params: List[Parameter]) -> SetParametersResult:
        """The table's rules, then the prompt against the loaded model's chat template and the
        detect.* parameters together (and vision_msgs, to turn detections on)."""
        result = validate_changes(params)
        if not result.successful:
            return result
        for p in params:
            problem = self._prompt_problem(str(p.value)) if p.name == "prompt" else None
            if problem:
                return SetParametersResult(successful=False, reason=f"parameter prompt: {problem}")
        problem = self._detect_change_problem(params)
        if problem:
            return SetParametersResult(successful=False, reason=problem)
        return result

    def _detect_change_problem(self, params: List[Parameter]) -> Optional[str]:
        changed = {p.name: p.value for p in params if p.name.startswith("detect.")}
        if not changed:
            return None
        values = {name: self._value(name) for name in DETECT_PARAMS}
        values.update(changed)
        problem = detect_problem(values)
        outputs = getattr(self, "_detections", None)
        if problem is None and changed.get("detect.enabled") and outputs is not None and outputs.unavailable:
            problem = f"detect.enabled: {outputs.unavailable}"
        return problem

    def _prompt_problem(self, prompt: str) -> Optional[str]:
        """Why ``prompt`` cannot be the sets' text (model.processor.TensorProcessor.prompt_problem:
        special tokens, a template that fails), or None; None too before a model is loaded
        (configure checks the prompt then)."""
        processor = getattr(self.model, "processor", None)
        if not hasattr(processor, "prompt_problem"):
            return None
        clips = int(self._value("video.frames")) >= 2
        return processor.prompt_problem(prompt, (clips,) * len(self._topics))

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
                    self._intake.set_max_rate(float(p.value))
            elif p.name == "detect.enabled" and p.value and self._detections is not None:
                self._create_detection_outputs()

    def _load_model(self):
        import torch

        from ..model import BatchedQwenVL

        v = self._value
        path = resolve_checkpoint(str(v("model.path")))
        dtype = str(v("model.dtype"))
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
        """Subscription callback: the intake converts (outside the lock) and synchronizes; the sets
        within max_rate go to the batcher. Never raises."""
        self._monitor.frame_received(index)
        arrival_ns = self.get_clock().now().nanoseconds
        stamp = msg.header.stamp  # an out-of-range stamp (dropped by the intake) is no evidence of loss
        self._loss.frame(index, 0 if stamp_problem(stamp) else stamp_ns(stamp))
        try:
            frame = self._intake.convert(index, msg, arrival_ns)
        except Exception as exc:  # ConversionError, the model's size limits, anything a decoder may raise
            self._invalid_frame(index, exc)
            return
        self._monitor.frame_valid(index, frame.size, frame_id=str(msg.header.frame_id))
        with self._lock:
            out = self._intake.push(frame)
            counts = self._sync.stats()
            self._monitor.frames_settled(counts["drops"], sum(counts["used"]))
            if out.reset:
                self._log_sync_reset()
            for made in out.sets:
                if made.ready is None:  # a camera does not hold a full clip yet
                    continue
                self._latest = made.ready
                self._monitor.set_made()
                if made.admitted:
                    self._batcher.put(made.ready)
                else:
                    self._monitor.sets_dropped("rate_limit")

    def _log_sync_reset(self) -> None:
        """Log a synchronizer reset with its cause, at most once per log_throttle period."""
        suppressed = self._log_throttle.check(("sync_reset",))
        if suppressed is None:
            return
        cause = self._sync.stats()["last_reset"] or {}
        k = cause.get("input")
        what = (f"camera {self._names[k]} stamp went back from {format_stamp(cause['from_ns'])} to "
                f"{format_stamp(max(0, cause['to_ns']))}" if k is not None else "reset requested")
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        self.get_logger().warning(f"synchronizer reset: {what}; queued frames dropped{more}")

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

    # ------------------------------------------------------------------------- time and health
    def _on_time_jump(self, jump) -> None:
        backwards = jump.delta.nanoseconds < 0
        if not backwards and jump.clock_change == ClockChange.ROS_TIME_NO_CHANGE:
            return
        with self._lock:
            self._intake.reset()
            self._latest = None
            self._epoch += 1
            dropped = self._batcher.clear("time_reset")
        self._monitor.sets_dropped("time_reset", dropped)
        self._monitor.clear_latency()
        what = "went back" if backwards else "changed source"
        self.get_logger().info(f"time {what} ({jump.delta.nanoseconds * 1e-9:+.3f} s): synchronizer reset, "
                               f"{dropped} queued set(s) of the old timeline dropped")

    # ------------------------------------------------------------------------- ~/ask
    def _submit_answer(self, task, cancel) -> Optional[str]:
        """Queue an answer for the worker: None, or why not."""
        batcher = self._batcher
        if batcher is None or not self._configured or not self._active:
            return "the node is not active"
        model = self.model
        if batcher.submit(lambda: task(model), cancel):
            return None
        if batcher.stopping or not self._active:
            return "the node is not active"
        return f"busy: {batcher.stats()['tasks_waiting']} questions already wait (ask.queue_depth)"

    def _ask_limits(self) -> AskLimits:
        v = self._value
        return AskLimits(max_new_tokens=int(v("ask.max_new_tokens")), max_prompt_chars=int(v("ask.max_prompt_chars")),
                         default_tokens=int(v("caption.max_new_tokens")))

    def _detect_limits(self) -> DetectLimits:
        return DetectLimits(max_detections=int(self._value("detect.max_detections")),
                            min_detections=int(self._value("detect.min_detections")))

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
        """Stop the work in flight at its next decode step, join the worker (queued sets are
        discarded), destroy ``~/ask`` (service and actions), then the node."""
        self._active = False
        try:
            if getattr(self, "_stops", None) is not None:
                self._stop_work("node shutting down")
            self._cleanup()
            if getattr(self, "_ask", None) is not None:
                self._ask.destroy()
                self._ask = None
            for action in getattr(self, "_actions", None) or []:
                action.destroy()
            self._actions = []
        finally:  # rclpy's part always runs: the node leaves its context, which can then shut down
            super().destroy_node()


