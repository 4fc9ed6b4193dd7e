"""The model side of ``qvl_node`` (:class:`NodeResults`, a mixin of
:class:`~qvl_ros.ros.pipeline.QvlNodeMixin`): the batcher worker's model call
(:func:`qvl_ros.core.model_call.call_model`), the messages it publishes, model errors, and the
``/diagnostics`` it publishes. With ``detect.enabled`` a second call on the same batch,
after its features are published (:func:`qvl_ros.core.model_call.call_detect`), gives the
detections (:mod:`qvl_ros.ros.node_detections`): a batch then costs both calls, one after the other."""
from __future__ import annotations

import time
from typing import Any, List, Optional, Sequence

from ..core.diagnostics import ERROR
from ..core.model_call import DetectRequest, ModelRequest, call_detect, call_model
from ..core.stamps import format_stamps
from ..core.synchronizer import SyncSet
from ..core.warmup import frame_sizes as warmup_frame_sizes
from .diagnostic_array import to_diagnostic_array
from .feature_msgs import caption_fields, features_fields, hidden_rows_of, sample_tensors, set_info
from .tensor_msg import from_tensor

__all__ = ["NodeResults", "describe_device", "release_device_memory"]


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


class NodeResults:
    """Model calls, publishing and diagnostics of the node (attributes set up by the pipeline)."""

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
        with self._stops.control() as control:  # captions and detections stop at the next decode step on deactivate
            if control.stopped:
                self._stopped_sets(len(sets), settings)
                return
            try:
                self._run_sets(sets, settings, control)
            finally:
                if settings["detect"] is not None and not control.stopped:
                    self._detect(sets, settings, control)

    def _run_sets(self, sets: List[SyncSet], settings: dict, control) -> None:
        t0 = time.perf_counter()
        try:
            results = self._infer(sets, settings, control)
        except Exception as exc:
            if len(sets) == 1:
                raise
            self.get_logger().warning(
                f"model failed on a batch of {len(sets)} sets ({type(exc).__name__}: {exc}); "
                f"retrying them one at a time")
            for s in sets:
                try:
                    self._publish([s], self._infer([s], settings, control), settings, control)
                except Exception as one_exc:
                    self._on_model_error([s], one_exc)
            return
        self._monitor.batch_done(len(sets), time.perf_counter() - t0)
        self._publish(sets, results, settings, control)

    def _stopped_sets(self, n: int, settings: dict) -> None:
        """Sets whose model call was stopped (a transition): dropped, never published half done."""
        self._monitor.sets_dropped(self._publish_drop_reason(settings) or "inactive", n)

    def _batch_settings(self) -> dict:
        v = self._value
        return {
            "prompt": str(v("prompt")), "kinds": list(v("features")), "frame_id": str(v("frame_id")),
            "caption": bool(v("caption.enabled")), "max_new_tokens": int(v("caption.max_new_tokens")),
            "detect": self._detect_request(),
        }

    def _detect_request(self) -> Optional[DetectRequest]:
        """The detections the settings ask for, or None (off, or vision_msgs missing)."""
        v = self._value
        outputs = getattr(self, "_detections", None)
        if not v("detect.enabled") or outputs is None or not outputs.created:
            return None
        return DetectRequest(classes=tuple(str(c) for c in v("detect.classes") if str(c).strip()),
                             query=str(v("detect.query")), max_detections=int(v("detect.max_detections")),
                             min_detections=int(v("detect.min_detections")))

    def _detect(self, sets: Sequence[SyncSet], settings: dict, control=None) -> None:
        """One model.detect for the batch's sets; per set and camera an array (and image). A
        failure is logged (throttled) and counted as ``detect_error``; features are not affected.
        Stopped (deactivate, cleanup, shutdown) between decode steps: nothing is published."""
        try:
            detections = call_detect(self.model, sets, settings["detect"], control=control)
        except Exception as exc:
            self._monitor.sets_dropped("detect_error", len(sets))
            if self._log_throttle.check(("detect", type(exc).__name__)) is not None:
                self.get_logger().error(f"detection failed on {len(sets)} set(s): {type(exc).__name__}: {exc}")
            return
        if (control is not None and control.stopped) or self._publish_drop_reason(settings) is not None:
            return
        try:
            self._detections.publish(sets, detections)
        except Exception as exc:
            self._publish_failed(exc)

    def _infer(self, sets: Sequence[SyncSet], settings: dict, control=None):
        request = ModelRequest(settings["prompt"], features=True, texts=settings["caption"],
                               max_new_tokens=settings["max_new_tokens"])
        return call_model(self.model, sets, request, control=control)

    def _publish(self, sets: Sequence[SyncSet], results, settings: dict, control=None) -> None:
        """One message (pair) per set. Sets of an older timeline (time went back while they ran)
        or finished after deactivation are dropped and counted; a failing publish is counted as
        ``publish_error`` (silently while the context shuts down), never as a model failure."""
        features, texts = results
        if control is not None and control.stopped and texts is not None:
            self._stopped_sets(len(sets), settings)
            return
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
        stamps = "; ".join(format_stamps(s.stamps) for s in sets)
        self.get_logger().error(f"model failed on {len(sets)} set(s) with camera stamps {stamps}: {reason}")

    def _publish_diagnostics(self) -> None:
        try:
            statuses = self._monitor.statuses(
                self.get_fully_qualified_name(), self._sync.stats(), self._batcher.stats(),
                extra=[("model", self._model_name), ("device", str(self._device)),
                       ("active", str(self._active).lower()), ("subscribed", str(self.subscribed).lower()),
                       ("graph captures after warm-up", str(getattr(self.model, "late_captures", 0)))]
                + self._ask_diagnostics()
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

    def _ask_diagnostics(self) -> list:
        """~/ask counters as summary key-values, and the tokens of the answer in progress."""
        ask = self._ask
        if ask is None:
            return []
        running = ask.running
        return [("ask answered", str(ask.answered)), ("ask refused", str(ask.refused)),
                ("ask stopped", str(ask.stopped)),
                ("ask answer tokens", "none" if running is None else str(running.steps))]

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

