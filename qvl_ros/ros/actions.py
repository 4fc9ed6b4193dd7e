"""Actions ``~/ask`` and ``~/detect`` of qvl_node: a question or a detection request about the
newest synchronized set, decoded by the batch worker between the batches, its progress streamed
as feedback, cancellable between two decode steps.

* ``~/ask`` (``qvl_ros/action/Ask``): goal as the ``~/ask`` service's request (same limits,
  :func:`qvl_ros.core.ask_request.check_ask`); feedback: the answer so far and its tokens; result:
  the answer, the cameras and their input headers, the set's stamp, the tokens.
* ``~/detect`` (``qvl_ros/action/Detect``, built where vision_msgs is installed): goal: classes or
  a query, cameras, most detections per camera (:func:`qvl_ros.core.ask_request.check_detect`);
  feedback: per camera the detections parsed from the answer so far
  (:func:`qvl_ros.model.grounding.parse_tokens`, the library's parse) as a
  ``vision_msgs/Detection2DArray`` with the camera's input header; result: the same with the
  detections' scores (:func:`qvl_ros.core.model_call.call_detect`).

The service ``~/ask`` and the action ``~/ask`` do not collide: an action's services and topics live
under ``<name>/_action/``.

A goal is checked in the goal callback and handed to the worker there (the question queue of
``ask.queue_depth``, shared with the service): a goal beyond the limits, without a set, while the
node is inactive, or beyond the queue is rejected, the reason logged (at most once per
``log_throttle`` period and kind of reason; a rejected goal has no result). An accepted goal decodes with a DecodeControl of the node's stop switch (private decode
state; every ``ANSWER_CHUNK`` decode steps the feedback is published and the due batches run, so
the feature stream keeps going). A cancel stops the decoding before its next step (the goal ends
canceled, with what was decoded until then); deactivate, cleanup and shutdown stop it the same
way (the goal is aborted with the reason). The worker wakes the executor through a guard condition
when a result is ready.

Goal requests queue up to ``ask.request_depth`` in the goal service (a burst is answered, rejected
beyond the question queue, rather than dropped); a finished goal's result is kept
``RESULT_KEEP_S`` for its client.

The action servers live as long as the node (created with it, destroyed by ``destroy_node`` after
the worker was joined), like the ``~/ask`` service.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.qos import QoSProfile
from rclpy.task import Future

from ..core.ask_request import AskLimits, AskRefused, DetectLimits, check_ask, check_detect
from ..core.diagnostics import LogThrottle
from ..core.model_call import DetectRequest, ModelRequest, call_detect, call_model, model_inputs
from ..core.stamps import stamp_ns
from ..model.grounding import parse_tokens
from .ask import ANSWER_CHUNK
from .detection_msgs import detection_array
from .feature_msgs import ros_string, time_msg

__all__ = ["AskAction", "DetectAction", "GoalJob", "feedback_text"]

_REASON_CHARS = 300  # of a rejection logged
RESULT_KEEP_S = 60  # how long a finished goal's result waits for its client (rclpy's default: 900 s)
ACCEPT_WAIT_S = 1.0  # longest wait of the worker for a queued goal's handle


def feedback_text(text: str) -> str:
    """The answer so far as a prefix of the final text: a token sequence cut inside a character
    decodes to replacement characters at its end, which are left out."""
    return text.rstrip("\ufffd")


class _NotRun(Exception):
    """A goal cancelled or dropped before it ran (cancel, deactivate, cleanup, shutdown)."""


class GoalJob:
    """One accepted goal: what the worker runs, its DecodeControl once running, its outcome."""

    def __init__(self, plan: Any, sync_set: Any, headers: Sequence[Any]) -> None:
        self.plan, self.sync_set, self.headers = plan, sync_set, list(headers)
        self.done: Future = Future()
        self.handle: Any = None
        self.control: Any = None
        self.feedbacks = 0
        self.accepted = threading.Event()  # the goal handle is known (feedback can be sent)
        self._lock = threading.Lock()
        self._cancel: Optional[str] = None

    def finish(self, value: Any) -> bool:
        """Set the outcome once (worker or cancel); False when it was set already."""
        with self._lock:
            if self.done.done():
                return False
            self.done.set_result(value)
            return True

    def attach(self, control: Any) -> None:
        """The running decode's control (stopped at once when a cancel came first)."""
        with self._lock:
            self.control = control
            if self._cancel is not None:
                control.stop(self._cancel)

    def cancel(self, reason: str) -> None:
        """Stop the decoding before its next step; a goal still waiting ends at once."""
        with self._lock:
            self._cancel = reason
            control = self.control
        if control is not None:
            control.stop(reason)
        else:
            self.finish(_NotRun(reason))


class _GoalServer:
    """What ``~/ask`` and ``~/detect`` share: checks, the hand-over to the worker, cancel, results."""

    kind = "goal"

    def __init__(self, node, action_type, name: str, *, latest: Callable[[], Optional[tuple]],
                 submit: Callable[..., Optional[str]], camera_names: Sequence[str], why_no_set: Callable[[], str],
                 control: Callable, between_chunks: Callable[[], object], request_depth: int,
                 log_throttle_s: float) -> None:
        self._node = node
        self._throttle = LogThrottle(log_throttle_s)
        self._action_type = action_type
        self._latest = latest
        self._submit = submit
        self._names = list(camera_names)
        self._why_no_set = why_no_set
        self._control = control
        self._between_chunks = between_chunks
        self._pending: dict = {}   # id(goal message) -> job, from the goal callback to acceptance
        self._jobs: dict = {}      # goal uuid -> job, until its result is sent
        self._lock = threading.Lock()
        self.accepted = self.rejected = self.succeeded = self.stopped = 0
        self.last_rejection: Optional[str] = None
        self.running: Any = None  # the DecodeControl of the goal being decoded, if any
        self._wake = node.create_guard_condition(lambda: None)
        self.server = ActionServer(node, action_type, name, self._execute, goal_callback=self._on_goal,
                                   handle_accepted_callback=self._on_accepted, cancel_callback=self._on_cancel,
                                   goal_service_qos_profile=QoSProfile(depth=int(request_depth)),
                                   result_timeout=RESULT_KEEP_S, callback_group=ReentrantCallbackGroup())

    def destroy(self) -> None:
        """Destroy the action server and the guard condition (the worker must be joined already)."""
        self.server.destroy()
        self._node.destroy_guard_condition(self._wake)

    # ----------------------------------------------------------------- subclass parts
    def _plan(self, goal) -> tuple:
        """(camera indices, plan) of a goal within the limits; AskRefused otherwise."""
        raise NotImplementedError

    def _work(self, job: GoalJob, model, control) -> Any:
        """On the worker: the model call of the goal with ``control``; its outcome."""
        raise NotImplementedError

    def _fill(self, result, job: GoalJob, outcome) -> None:
        """Put a finished (or stopped) outcome into the result message."""
        raise NotImplementedError

    # ----------------------------------------------------------------- goal life
    def _reject(self, reason: str) -> GoalResponse:
        """Reject, and log why (at most once per log_throttle period and kind of reason)."""
        self.rejected += 1
        self.last_rejection = reason
        key = tuple([w for w in reason.split() if not any(c.isdigit() for c in w)][:2])  # "busy:", "prompt has", ...
        suppressed = self._throttle.check(key)
        if suppressed is not None:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self._node.get_logger().warning(f"~/{self.kind} goal rejected: {reason[:_REASON_CHARS]}{more}")
        return GoalResponse.REJECT

    def _on_goal(self, goal) -> GoalResponse:
        try:
            plan = self._plan(goal)
        except AskRefused as exc:
            return self._reject(str(exc))
        newest = self._latest()
        if newest is None:
            return self._reject(f"no synchronized set available: {self._why_no_set()}")
        job = GoalJob(plan, *newest)
        refusal = self._submit(lambda model: self._run(job, model), lambda reason: self._end(job, _NotRun(reason)))
        if refusal is not None:
            return self._reject(refusal)
        with self._lock:
            self._pending[id(goal)] = job
        self.accepted += 1
        return GoalResponse.ACCEPT

    def _on_accepted(self, handle) -> None:
        with self._lock:
            job = self._pending.pop(id(handle.request))
            job.handle = handle
            self._jobs[bytes(handle.goal_id.uuid)] = job
        job.accepted.set()
        handle.execute()

    def _on_cancel(self, handle) -> CancelResponse:
        with self._lock:
            job = self._jobs.get(bytes(handle.goal_id.uuid))
        if job is None:
            return CancelResponse.REJECT
        job.cancel("cancelled")
        self._wake_executor()  # a goal that was still waiting has its outcome now
        return CancelResponse.ACCEPT

    def _wake_executor(self) -> None:
        try:
            self._wake.trigger()
        except Exception:  # the context is going down: nobody waits for the result any more
            pass

    def _end(self, job: GoalJob, outcome: Any) -> None:
        if job.finish(outcome):
            self._wake_executor()

    def _run(self, job: GoalJob, model) -> None:
        """On the worker: decode the goal chunk by chunk, the due batches and the feedback in between."""
        if job.done.done():  # cancelled while it waited
            return
        job.accepted.wait(ACCEPT_WAIT_S)  # the executor sends the acceptance right after queueing
        try:
            options = dict(private_state=True, chunk=ANSWER_CHUNK, on_chunk=self._between_chunks,
                           on_tokens=lambda ids: self._feedback(job, model, ids))
            with self._control(**options) as control:
                job.attach(control)
                self.running = control
                try:
                    outcome = (None, control) if control.stopped else (self._work(job, model, control), control)
                finally:
                    self.running = None
        except Exception as exc:  # reported in the result, the worker goes on
            outcome = exc
        self._end(job, outcome)

    def _feedback(self, job: GoalJob, model, ids) -> None:
        handle = job.handle
        if handle is None or job.control is None or job.control.stopped:
            return
        try:
            handle.publish_feedback(self._feedback_msg(job, model, ids))
            job.feedbacks += 1
        except Exception as exc:  # a goal that ended meanwhile; feedback is best effort
            self._node.get_logger().debug(f"~/{self.kind} feedback not sent: {exc}")

    def _feedback_msg(self, job: GoalJob, model, ids) -> Any:
        raise NotImplementedError

    async def _execute(self, handle):
        with self._lock:
            job = self._jobs[bytes(handle.goal_id.uuid)]
        outcome = await job.done
        with self._lock:
            self._jobs.pop(bytes(handle.goal_id.uuid), None)
        result = self._action_type.Result()
        chosen, _ = job.plan
        result.camera_names = [self._names[k] for k in chosen]
        result.stamp = time_msg(job.sync_set.stamp)
        if isinstance(outcome, _NotRun):
            return self._stop(handle, result, f"not run: {outcome}")
        if isinstance(outcome, BaseException):
            return self._stop(handle, result, f"model failed: {type(outcome).__name__}: {outcome}")
        value, control = outcome
        result.tokens = int(control.steps)
        if value is not None:
            self._fill(result, job, value)
        if control.stopped:
            self.stopped += 1
            return self._stop(handle, result, f"stopped after {control.steps} tokens: {control.reason}")
        result.success = True
        self.succeeded += 1
        handle.succeed()
        return result

    def _stop(self, handle, result, message: str):
        result.success, result.message = False, message
        if handle.is_cancel_requested:
            handle.canceled()
        else:
            handle.abort()
        return result


class AskAction(_GoalServer):
    """``~/ask`` as an action (see the module doc); ``limits()``: the node's AskLimits."""

    kind = "ask"

    def __init__(self, node, *, limits: Callable[[], AskLimits], **kwargs: Any) -> None:
        from qvl_ros.action import Ask

        self._limits = limits
        self._types = Ask
        super().__init__(node, Ask, "~/ask", **kwargs)

    def _plan(self, goal) -> tuple:
        chosen, tokens = check_ask(goal.prompt, list(goal.camera_names), int(goal.max_new_tokens), self._names,
                                   self._limits())
        return chosen, ModelRequest(goal.prompt, features=False, texts=True, max_new_tokens=tokens)

    def _work(self, job: GoalJob, model, control) -> str:
        chosen, question = job.plan
        return call_model(model, [job.sync_set], question, cameras=chosen, control=control)[1][0]

    def _feedback_msg(self, job: GoalJob, model, ids):
        return self._types.Feedback(text=ros_string(feedback_text(model.detokenize(ids)[0])), tokens=int(ids.shape[1]))

    def _fill(self, result, job: GoalJob, text: str) -> None:
        chosen, _ = job.plan
        result.text = ros_string(text)
        result.camera_headers = [job.headers[k] for k in chosen]


class DetectAction(_GoalServer):
    """``~/detect`` as an action (see the module doc); ``limits()``: the node's DetectLimits;
    ``types``: the vision_msgs classes (:func:`qvl_ros.ros.detection_msgs.rclpy_types`)."""

    kind = "detect"

    def __init__(self, node, *, limits: Callable[[], DetectLimits], types: Any, **kwargs: Any) -> None:
        from qvl_ros.action import Detect

        self._limits = limits
        self._vision = types
        self._types = Detect
        super().__init__(node, Detect, "~/detect", **kwargs)

    def _plan(self, goal) -> tuple:
        chosen, classes, query, most, fewest = check_detect(list(goal.classes), goal.query, list(goal.camera_names),
                                                            int(goal.max_detections), self._names, self._limits())
        return chosen, DetectRequest(classes=classes, query=query, max_detections=most, min_detections=fewest)

    def _work(self, job: GoalJob, model, control) -> list:
        chosen, request = job.plan
        return call_detect(model, [job.sync_set], request, cameras=chosen, control=control)[0]

    def _arrays(self, job: GoalJob, cameras: Sequence[Any]) -> list:
        chosen, _ = job.plan
        return [detection_array(self._vision, cam, stamp_ns(job.headers[k].stamp), str(job.headers[k].frame_id))
                for k, cam in zip(chosen, cameras)]

    def _feedback_msg(self, job: GoalJob, model, ids):
        chosen, request = job.plan
        images, _ = model_inputs([job.sync_set], chosen)
        parsed = parse_tokens(model, images, request.targets, ids)[0]
        return self._types.Feedback(camera_names=[self._names[k] for k in chosen], detections=self._arrays(job, parsed),
                                    tokens=int(ids.shape[1]))

    def _fill(self, result, job: GoalJob, cameras: list) -> None:
        result.detections = self._arrays(job, cameras)
